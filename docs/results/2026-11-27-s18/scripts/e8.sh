#!/usr/bin/env bash
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf exp4.tgz
nvidia-smi --query-gpu=name --format=csv,noheader
for v in base new2 base new2; do v/$v/kvq-gpu-bench --parts qprefill --json $OUT/qprefill_$v.json 2>&1 | grep -E "nuq3-1% +B|q4_0" | sed 's/  */ /g' | sed "s/^/$v /" | cut -d' ' -f1,3,6-9,12-15; done
v/new2/kvq_gpu_tests --gtest_filter='QuantizedAttention.PrefillKernelMatchesCpuTwin:QuantizedAttention.SanitizerQuantizedPrefillSmall:QuantizedAttention.PageScratch*:CudaBackend.Quantized*' > $OUT/tests_new2.log 2>&1; echo "tests rc $?"
grep -E "^\[ +(OK|FAILED|PASSED) +\]|Failure" $OUT/tests_new2.log | head -20
