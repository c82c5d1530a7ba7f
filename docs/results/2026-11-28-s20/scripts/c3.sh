#!/usr/bin/env bash
# Session 20, call 3: f3 (f2 with the static tables counted in the shared-memory budget): the whole GPU suite,
# qdecode against main (final), and Nsight Compute on page_fragment_kernel<64, 3, true> (smollm2 nuq3-1%).
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf main.tgz; tar xzf f3.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
timeout 300 ab/f3/kvq_gpu_tests --gtest_output=json:$OUT/gpu_tests.json > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED) +\]" $OUT/gpu_tests.log | head -20
grep -E -A2 "Failure|gpu .* cpu" $OUT/gpu_tests.log | head -20
for v in final f3; do
  ab/$v/kvq-gpu-bench --parts copy,qdecode --json $OUT/qd_${v}.json 2>&1 | grep -E "nuq|q4_0|fp8" | sed 's/  */ /g' | awk -v v=$v '{print v, $2, $4, $6, $10, $11}'
done
timeout 200 ncu --kernel-name-base demangled -k "regex:page_fragment_kernel<64, 3, true>" --launch-skip 3 --launch-count 1 \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section InstructionStats --section Occupancy \
  --section LaunchStats --section SourceCounters -o $OUT/frag ab/f3/kvq-gpu-bench --parts qdecode > $OUT/ncu_run.log 2>&1
echo "ncu rc $?"
ncu --import $OUT/frag.ncu-rep --print-summary none > $OUT/ncu_frag.txt 2>&1
ncu --import $OUT/frag.ncu-rep --page source --print-source sass --csv > $OUT/ncu_frag_sass.csv 2>&1
grep -E "Duration|Issue Slots Busy|Executed Ipc A|Achieved Occupancy|Registers|No Eligible|Eligible Warps|Active Warps Per|Warp Cycles Per Issued|Executed Instructions " $OUT/ncu_frag.txt | head -20
cd $OUT && tar czf logs.tgz *.log *.json *.txt *.csv *.ncu-rep && rm -f *.log *.json *.txt *.csv *.ncu-rep
