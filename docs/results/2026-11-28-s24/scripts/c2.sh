#!/usr/bin/env bash
# Session 24, call 2: int/nuq quantize-on-write with two rows a lane a round at head_dim 128 (d2), bounded to 8, 6 or
# 5 blocks a multiprocessor (64 / 80 / 96 registers), against base. Tests on d2b8; quantize bench and per-kernel
# step times alternating; end to end llama2-7b 2048 x 4.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; for v in base d2b8 d2b6 d2b5; do tar xzf $v.tgz; done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
timeout 200 ab/d2b8/kvq_gpu_tests --gtest_output=json:$OUT/gpu_tests.json > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED) +\]" $OUT/gpu_tests.log | head -20
grep -E -B2 -A6 "Failure" $OUT/gpu_tests.log | head -40
for v in base d2b8 d2b6 d2b5 base d2b8 d2b6 d2b5; do
  timeout 100 ab/$v/kvq-gpu-bench --parts quantize --json $OUT/quant_$v.json 2>&1 | grep -E "nuq3|nuq4|q4_0|int4" | grep -v "hd=64" | sed "s/^/$v /" | sed -E 's/kv_heads.*hd=[0-9]+ +//; s/GB\/s.*page tiles too/| tiles/'
done
for v in base d2b8 d2b6 d2b5; do
  timeout 120 ncu --metrics gpu__time_duration.sum --csv --print-units base ab/$v/kvq bench --dummy llama2-7b --prompt-len 2048 --batch 1 --gen 1 --repeats 1 --warmup 0 --energy-window 0 --kv nuq3-1% > /tmp/k.csv 2>/dev/null
  python3 - /tmp/k.csv "$v" <<'PY'
import csv,sys,collections,re
rows=[r for r in csv.reader(open(sys.argv[1])) if len(r)>10]
h=rows[0]; ik=h.index("Kernel Name"); iv=h.index("Metric Value")
t=collections.Counter()
for r in rows[1:]:
    k=r[ik]
    if 'quantize' in k: t['quantize']+=float(r[iv].replace(',',''))
print("== llama2 nuq3 step", sys.argv[2], " ".join("%s %.3f ms"%(k,v/1e6) for k,v in t.items()))
PY
done
e2e() {  # name, then kvq bench args
  local n=$1; shift
  timeout 100 ab/$v/kvq bench "$@" --gen 1 --warmup 1 --energy-window 0 --kv fp16,nuq3-1% --json $OUT/e2e_${n}_$v.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/e2e_${n}_$v.json'))['results']; f=r[0]
print('$v $n', ' '.join('%s prefill %.4f s x%.3f'%(q['kv'], q['prefill_s'], q['prefill_s']/f['prefill_s']) for q in r))"
}
for v in base d2b5 d2b8 base d2b5 d2b8; do e2e l2_2048x4 --dummy llama2-7b --prompt-len 2048 --batch 4 --repeats 3; done
cd $OUT && tar czf logs.tgz *.log *.json && rm -f *.log *.json
