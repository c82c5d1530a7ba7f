#!/usr/bin/env bash
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf exp3.tgz
nvidia-smi --query-gpu=name --format=csv,noheader
for v in base new; do echo "== $v"; v/$v/kvq-gpu-bench --parts qprefill --json $OUT/qprefill_$v.json 2>&1 | grep -E "qprefill" | grep -v fp16 | sed 's/  */ /g' | cut -d' ' -f2,4-7,9-13; done
v/new/kvq_gpu_tests --gtest_filter='QuantizedAttention.*:CudaBackend.Quantized*' > $OUT/tests_new.log 2>&1; echo "tests rc $?"
grep -E "^\[ +(OK|FAILED|PASSED) +\]|Failure" $OUT/tests_new.log | head -20
