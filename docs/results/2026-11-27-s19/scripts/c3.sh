#!/usr/bin/env bash
# Session 19, call 3: host time per prefill step (plan_step, plan_quantized_step, upload_quantized, enqueue),
# from a build of main with timers around them (printed at exit), against the prefill wall time.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf ht.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
one() {  # name, kv, args
  local n=$1 kv=$2; shift 2
  ht/kvq bench "$@" --gen 1 --kv $kv --repeats 2 --warmup 1 --energy-window 0 --json $OUT/$n.json > $OUT/$n.log 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/$n.json'))['results'][0]
print('$n'.replace('%','pct'), 'prefill_s', r['prefill_s'])"
  grep HOSTTIME $OUT/$n.log
}
for kv in fp16 nuq3-1%; do
  one smol2048x64_$kv $kv --dummy smollm2-135m --prompt-len 2048 --batch 64
  one smol2048x16c16k_$kv $kv --dummy smollm2-135m --prompt-len 2048 --batch 16 --chunk 16384
  one llama2048x4_$kv $kv --dummy llama2-7b --prompt-len 2048 --batch 4
done
cd $OUT && tar czf logs.tgz *.log *.json && rm -f *.log *.json
