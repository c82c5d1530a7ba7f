#!/usr/bin/env bash
# Session 22, call 7: v6 = the tree after the review's mends (every run_case run of int/nuq formats with bands copies
# band tiles from the quantize launch's rotated keys; the producer's rotation back in its own file). GPU suite and
# sanitizers; the quantize and qprefill benches for the tail format as a sanity check.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf v6.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
v=v6
timeout 300 ab/$v/kvq_gpu_tests --gtest_output=json:$OUT/gpu_tests.json > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED) +\]" $OUT/gpu_tests.log | head -20
grep -E -A3 "Failure" $OUT/gpu_tests.log | head -30
SUBSET='QuantizedAttention.Sanitizer*:CudaKernels.SanitizerAttentionSmall:KvQuantize.SanitizerSubset'
for tool in memcheck racecheck; do
  timeout 120 compute-sanitizer --tool $tool --error-exitcode 3 ab/$v/kvq_gpu_tests --gtest_filter="$SUBSET" > $OUT/san_$tool.log 2>&1
  echo "$tool rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/san_$tool.log | tail -1)"
done
cd $OUT && tar czf logs.tgz *.log *.json && rm -f *.log *.json
