#!/usr/bin/env bash
# Session 21, call 7: smollm2-135m 64 x 8160 prefill (chunks of 2048: later chunks read earlier rows), base / v7.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf base.tgz; tar xzf v7.tgz
nvidia-smi --query-gpu=name --format=csv,noheader
for r in 1 2; do for v in base v7; do
  timeout 60 ab/$v/kvq bench --dummy smollm2-135m --prompt-len 8160 --batch 64 --gen 1 --repeats 1 --warmup 1 --energy-window 0 --kv fp16,nuq3-1% --json $OUT/p_${v}_$r.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/p_${v}_$r.json'))['results']; f=r[0]
print('$v', ' '.join('%s prefill %.4f s x%.3f'%(q['kv'], q['prefill_s'], q['prefill_s']/f['prefill_s']) for q in r))"
done; done
