#!/usr/bin/env bash
# Session 20, call 4: Nsight Compute on page_fragment_kernel<64, 3, true> (f3, smollm2 64 x 8192 nuq3-1%).
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf f3.tgz
timeout 240 ncu --kernel-name-base demangled -k 'regex:page_fragment_kernel<\(int\)64, \(int\)3' --launch-skip 3 --launch-count 1 \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section InstructionStats --section Occupancy \
  --section LaunchStats --section SourceCounters -o $OUT/frag ab/f3/kvq-gpu-bench --parts qdecode > $OUT/ncu_run.log 2>&1
echo "ncu rc $?"
ncu --import $OUT/frag.ncu-rep --print-summary none > $OUT/ncu_frag.txt 2>&1
ncu --import $OUT/frag.ncu-rep --page source --print-source sass --csv > $OUT/ncu_frag_sass.csv 2>&1
grep -E "Duration|Issue Slots Busy|Executed Ipc A|Achieved Occupancy|Registers|No Eligible|Eligible Warps|Active Warps Per|Warp Cycles Per Issued|Executed Instructions " $OUT/ncu_frag.txt | head -20
cd $OUT && tar czf logs.tgz *.log *.txt *.csv && rm -f *.log *.txt *.csv
