#!/usr/bin/env bash
# Session 22, call 6: session 21's head (59d43c8, "base") against this session's final device code (v5 = 686f6a1),
# end to end, alternating: prefill x fp16 at llama2-7b 2048 x 4 (three rounds) and smollm2 2048 x 64 (two rounds),
# decode smollm2 64 x 8160 (one round each).
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf base.tgz; tar xzf v5.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
e2e() {  # name, then kvq bench args
  local n=$1; shift
  ab/$v/kvq bench "$@" --warmup 1 --energy-window 0 --json $OUT/${n}_${v}.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/${n}_${v}.json'))['results']; f=r[0]
print('$v $n', ' '.join('%s prefill %.4f s x%.3f decode %.0f tok/s x%.3f'%(q['kv'], q['prefill_s'], q['prefill_s']/f['prefill_s'], q['decode_tok_s'], q['decode_tok_s']/f['decode_tok_s']) for q in r))"
}
for round in 1 2 3; do for v in base v5; do
  e2e l2_$round --dummy llama2-7b --prompt-len 2048 --batch 4 --gen 1 --repeats 3 --kv fp16,nuq3-1%
done; done
for round in 1 2; do for v in base v5; do
  e2e sm_$round --dummy smollm2-135m --prompt-len 2048 --batch 64 --gen 1 --repeats 3 --kv fp16,nuq3-1%
done; done
for v in base v5; do
  e2e dec --dummy smollm2-135m --prompt-len 8160 --batch 64 --gen 16 --repeats 1 --kv fp16,nuq3-1%
done
cd $OUT && tar czf logs.tgz *.json && rm -f *.json
