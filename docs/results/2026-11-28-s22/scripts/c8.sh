#!/usr/bin/env bash
# Session 22, call 8: v7 = the final read's mends (ScratchPageProducer's copy of the step's rotated keys through
# copy_rows; host-side tidying). GPU suite and sanitizers first, then qprefill v6 (call 7's tree) against v7.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf v6.tgz; tar xzf v7.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
v=v7
timeout 150 ab/$v/kvq_gpu_tests > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED) +\]" $OUT/gpu_tests.log | head -20 | tee $OUT/summary.txt
grep -E -A3 "Failure" $OUT/gpu_tests.log | head -20
SUBSET='QuantizedAttention.Sanitizer*:CudaKernels.SanitizerAttentionSmall:KvQuantize.SanitizerSubset'
for tool in memcheck racecheck; do
  timeout 90 compute-sanitizer --tool $tool --error-exitcode 3 ab/$v/kvq_gpu_tests --gtest_filter="$SUBSET" > $OUT/san_$tool.log 2>&1
  echo "$tool rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/san_$tool.log | tail -1)" | tee -a $OUT/summary.txt
done
for v in v6 v7; do
  timeout 40 ab/$v/kvq-gpu-bench --parts qprefill 2>&1 | grep -E "llama2.*(nuq3|fp16)" | sed "s/^/$v /" | tee -a $OUT/summary.txt
done
