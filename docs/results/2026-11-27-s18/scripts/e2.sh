#!/usr/bin/env bash
# Experiment 2: Nsight Compute on the page kernel, base and the timing-only "all" variant.
cd "$(dirname "$0")"; [ -d v ] || tar xzf exp1.tgz; export LD_LIBRARY_PATH=$PWD/lib:$LD_LIBRARY_PATH
S="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section InstructionStats --section MemoryWorkloadAnalysis"
for v in base all; do for skip in 40 180; do
  ncu $S --kernel-name regex:page_split --launch-skip $skip --launch-count 1 v/$v/kvq-gpu-bench --parts qdecode > $OUT/ncu_${v}_$skip.txt 2>&1
  echo "== $v skip $skip"; grep -E "page_split_kernel|Duration|Executed Ipc A|Issue Slots Busy|Achieved Occupancy|Registers Per|Executed Instructions  |Stall|No Eligible|Active Warps Per|Eligible Warps|Memory Throughput|DRAM Through" $OUT/ncu_${v}_$skip.txt | head -30
done; done
