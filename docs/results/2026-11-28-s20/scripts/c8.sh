#!/usr/bin/env bash
# Session 20, call 8 (H100): the final tree's device code (f6): qdecode against main (final), decode end to end.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf main.tgz; tar xzf f6.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
for v in final f6; do
  ab/$v/kvq-gpu-bench --parts copy,qdecode --json $OUT/qd_${v}.json 2>&1 | grep -E "nuq|q4_0|fp8" | sed 's/  */ /g' | awk -v v=$v '{print v, $2, $4, $6, $10, $11}' | tr '\n' ' '; echo
done
v=f6
for m in "smollm2-135m 64" "llama3-8b 16"; do set -- $m
  ab/$v/kvq bench --dummy $1 --prompt-len 8160 --batch $2 --gen 16 --repeats 2 --kv fp16,nuq3-1%,nuq4-1% --warmup 1 --energy-window 0 --json $OUT/dec_$1_${v}.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/dec_$1_${v}.json'))['results']; f=r[0]
print('$v $1', ' '.join('%s %.0f tok/s x%.3f'%(q['kv'], q['decode_tok_s'], q['decode_tok_s']/f['decode_tok_s']) for q in r))"
done
cd $OUT && tar czf logs.tgz *.json && rm -f *.json
