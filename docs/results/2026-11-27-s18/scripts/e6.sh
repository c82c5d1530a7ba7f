#!/usr/bin/env bash
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; ls v/base >/dev/null 2>&1 || { tar xzf lib.tgz; tar xzf exp2.tgz; }
# fill kernel launches: per qprefill point and format 3 + 10 (time_kernel_ms(fill, 3, 10)); llama2 4x2048 nuq3: point 3, format 2
# order: smollm2 (6 formats), llama2 1x2048 (6), llama2 4x2048: nuq4, nuq3 -> skip (12 * 13 + 13 + 3)
ncu --set full --import-source no --kernel-name regex:fill_page_scratch --launch-skip 172 --launch-count 1 -o /tmp/fill v/base/kvq-gpu-bench --parts qprefill > /dev/null 2>&1
ncu -i /tmp/fill.ncu-rep --page details > $OUT/fill_details.txt 2>&1
ncu -i /tmp/fill.ncu-rep --page source --csv --print-source sass > /tmp/fill_src.csv 2>&1; gzip -c /tmp/fill_src.csv > $OUT/fill_src.csv.gz
grep -E "fill_page_scratch|Duration|DRAM Through|Issue Slots|Achieved Occ|Registers Per|No Eligible|Executed Instructions  |L1/TEX Hit|L2 Hit|Mem Busy" $OUT/fill_details.txt | head -20
