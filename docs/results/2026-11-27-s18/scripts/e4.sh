#!/usr/bin/env bash
# Experiment 4: stage issue loop, 256-row stages, fp16 value decode; the twin tests on the combined variant.
cd "$(dirname "$0")"; tar xzf lib.tgz; tar xzf exp2.tgz; export LD_LIBRARY_PATH=$PWD/lib:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for round in 1 2; do for v in base issue2 st256 both vhalf vall; do
  echo "== $v round $round"
  v/$v/kvq-gpu-bench --parts copy,qdecode --json $OUT/${v}_$round.json 2>&1 | grep -E "qdecode-attn" | sed 's/  */ /g' | cut -d' ' -f2,4,12-14
done; done
v/vall/kvq_gpu_tests --gtest_filter='QuantizedAttention.MatchesCpuTwinOnTheSameBytes:QuantizedAttention.LongSplits*:QuantizedAttention.SanitizerSmall:CudaBackend.Quantized*' > $OUT/tests_vall.log 2>&1; echo "tests rc $?"
grep -E "^\[ +(OK|FAILED|PASSED) +\]|Failure|worst" $OUT/tests_vall.log | head -40
