#!/usr/bin/env bash
# Session 23, call 1: profile quantize-on-write (head 928382d) with source counters: llama2-7b and smollm2-135m nuq3-1% 2048-token steps.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf base.tgz
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
ncu --version | tail -1
prof() {  # name, kernel regex, model
  timeout 200 ncu --kernel-name regex:$2 --launch-skip 6 --launch-count 1 --set full --import-source no -f -o /tmp/$1 \
    ab/base/kvq bench --dummy $3 --prompt-len 2048 --batch 1 --gen 1 --repeats 1 --warmup 0 --energy-window 0 --kv nuq3-1% > /tmp/$1.log 2>&1
  echo "$1 rc $?"; tail -3 /tmp/$1.log
  ncu -i /tmp/$1.ncu-rep --page source --csv --print-source sass > $OUT/$1_sass.csv 2> /tmp/$1.err; echo "sass rc $? $(wc -l < $OUT/$1_sass.csv)"; head -c 300 /tmp/$1.err
  ncu -i /tmp/$1.ncu-rep --page details --csv > $OUT/$1_details.csv 2>&1; echo "details $(wc -l < $OUT/$1_details.csv)"
  ncu -i /tmp/$1.ncu-rep --page raw --csv > $OUT/$1_raw.csv 2>&1
  gzip $OUT/$1_sass.csv $OUT/$1_raw.csv
}
prof q128 kv_quantize_kernel_128 llama2-7b
prof q64 kv_quantize_kernel_64 smollm2-135m
grep -E "Duration|Registers|Achieved Occupancy|Executed Ipc A|Issue Slots Busy|Memory Throughput|Warp Cycles Per Issued|No Eligible" $OUT/q128_details.csv | cut -c1-200 | head -20
