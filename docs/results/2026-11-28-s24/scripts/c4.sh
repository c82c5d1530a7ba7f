#!/usr/bin/env bash
# Session 24, call 4: (a) where the two-rows-a-lane variant (d2b5, 1.7x slower in call 2) loses: source-level profile;
# (b) v2 = write runs planned kind-major, and with KVQ_SPLIT_KINDS=1 the backend quantizes keys and values in two
# launches (each multiprocessor then runs one kind's code at a time). Tests with the split; per-kernel; end to end.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; for v in base v2 d2b5; do tar xzf $v.tgz; done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
prof() {  # name, binary
  timeout 100 ncu --kernel-name regex:kv_quantize_calibrated_128 --launch-skip 6 --launch-count 1 --set full --import-source no -f -o /tmp/$1 \
    ab/$2/kvq bench --dummy llama2-7b --prompt-len 2048 --batch 1 --gen 1 --repeats 1 --warmup 0 --energy-window 0 --kv nuq3-1% > /dev/null 2>&1
  ncu -i /tmp/$1.ncu-rep --page source --csv --print-source sass | gzip > $OUT/$1_sass.csv.gz; ncu -i /tmp/$1.ncu-rep --page details --csv > $OUT/$1_details.csv
  grep -E "\"(Duration|Executed Instructions|Issue Slots Busy|Achieved Occupancy)\"" $OUT/$1_details.csv | awk -F'","' '{print "'$1'", $(NF-2), $(NF-1), $NF}'
}
prof d2b5 d2b5
KVQ_SPLIT_KINDS=1 timeout 200 ab/v2/kvq_gpu_tests --gtest_output=json:$OUT/gpu_tests.json > $OUT/gpu_tests.log 2>&1; echo "gpu tests (split) rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED) +\]" $OUT/gpu_tests.log | head -20
grep -E -B2 -A6 "Failure" $OUT/gpu_tests.log | head -30
kern() {  # label, binary, model
  timeout 120 ncu --metrics gpu__time_duration.sum --csv --print-units base ab/$2/kvq bench --dummy $3 --prompt-len 2048 --batch 1 --gen 1 --repeats 1 --warmup 0 --energy-window 0 --kv nuq3-1% > /tmp/k.csv 2>/dev/null
  python3 - /tmp/k.csv "$1 $3" <<'PY'
import csv,sys,collections
rows=[r for r in csv.reader(open(sys.argv[1])) if len(r)>10]
h=rows[0]; ik=h.index("Kernel Name"); iv=h.index("Metric Value")
t=sum(float(r[iv].replace(',','')) for r in rows[1:] if 'quantize' in r[ik])
print("== nuq3 step quantize", sys.argv[2], "%.3f ms"%(t/1e6))
PY
}
for m in llama2-7b smollm2-135m; do kern base base $m; kern v2 v2 $m; KVQ_SPLIT_KINDS=1 kern v2split v2 $m; done
e2e() {  # label, binary, then kvq bench args
  local l=$1 b=$2; shift 2
  timeout 100 ab/$b/kvq bench "$@" --gen 1 --warmup 1 --energy-window 0 --kv fp16,nuq3-1% --json $OUT/e2e.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/e2e.json'))['results']; f=r[0]
print('$l', '$*'.split()[1], ' '.join('%s prefill %.4f s x%.3f'%(q['kv'], q['prefill_s'], q['prefill_s']/f['prefill_s']) for q in r))"
}
for round in 1 2; do
  e2e base base --dummy llama2-7b --prompt-len 2048 --batch 4 --repeats 3
  KVQ_SPLIT_KINDS=1 e2e v2split v2 --dummy llama2-7b --prompt-len 2048 --batch 4 --repeats 3
  e2e base base --dummy smollm2-135m --prompt-len 2048 --batch 64 --repeats 3
  KVQ_SPLIT_KINDS=1 e2e v2split v2 --dummy smollm2-135m --prompt-len 2048 --batch 64 --repeats 3
done
cd $OUT && tar czf logs.tgz *.log && rm -f *.log *.json
