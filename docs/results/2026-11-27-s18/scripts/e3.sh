#!/usr/bin/env bash
# Experiment 3: per-instruction execution counts of the page kernel (base), smollm2 and llama3 nuq3-1%.
cd "$(dirname "$0")"; [ -d v ] || tar xzf exp1.tgz; export LD_LIBRARY_PATH=$PWD/lib:$LD_LIBRARY_PATH
for skip in 40 180; do
  ncu --section SourceCounters --section WarpStateStats --kernel-name regex:page_split --launch-skip $skip --launch-count 1 -o /tmp/rep_$skip v/base/kvq-gpu-bench --parts qdecode > /dev/null 2>&1
  ncu -i /tmp/rep_$skip.ncu-rep --page source --csv --print-source sass > /tmp/src_$skip.csv 2>&1
  ncu -i /tmp/rep_$skip.ncu-rep --page details > $OUT/details_$skip.txt 2>&1
done
cd /tmp && tar czf $OUT/src.tgz src_40.csv src_180.csv && ls -la $OUT
