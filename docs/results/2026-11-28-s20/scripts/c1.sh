#!/usr/bin/env bash
# Session 20, call 1: page_fragment_kernel (f1) — the whole GPU suite, sanitizers, then qdecode against main (final).
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf main.tgz; tar xzf f1.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
timeout 300 ab/f1/kvq_gpu_tests --gtest_output=json:$OUT/gpu_tests.json > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED) +\]" $OUT/gpu_tests.log | head -20
grep -E "Failure|gpu .* cpu" $OUT/gpu_tests.log | head -20
SUBSET='QuantizedAttention.Sanitizer*'
for tool in memcheck racecheck; do
  timeout 120 compute-sanitizer --tool $tool --error-exitcode 3 ab/f1/kvq_gpu_tests --gtest_filter="$SUBSET" > $OUT/san_$tool.log 2>&1
  echo "$tool rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/san_$tool.log | tail -1)"
done
for round in 1 2; do for v in final f1; do
  ab/$v/kvq-gpu-bench --parts copy,qdecode --json $OUT/qd_${v}_$round.json 2>&1 | grep -E "nuq|q4_0|fp8|fp16" | sed 's/  */ /g' | awk -v v=$v '{print v, $0}' | cut -c1-150
done; done
cd $OUT && tar czf logs.tgz *.log *.json && rm -f *.log *.json
