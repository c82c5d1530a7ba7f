#!/usr/bin/env bash
# Session 19, call 2: pair tables for the packed decodes (decode_packed8) on top of the TMA stages: the
# quantized-attention tests, qdecode main / tma / pair alternating, decode end to end.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf ab1.tgz; mv ab/new ab/tma; tar xzf ab2.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
ab/pair/kvq_gpu_tests --gtest_filter='QuantizedAttention.*:CudaBackend.*' > $OUT/tests_pair.log 2>&1; echo "tests rc $?"
grep -E "^\[ +(FAILED|PASSED) +\]|worst abs" $OUT/tests_pair.log | head -12
for v in main tma pair main tma pair; do ab/$v/kvq-gpu-bench --parts copy,qdecode --json $OUT/qdecode_$v.json 2>&1 | grep -E "^qdecode" | sed 's/  */ /g' | awk -v v=$v '{print v, $2, $5, $10, $11}'; done
for round in 1 2; do for v in main pair; do
  ab/$v/kvq bench --dummy smollm2-135m --prompt-len 8160 --batch 64 --gen 16 --kv fp16,nuq3-1% --repeats 2 --warmup 1 --energy-window 0 --json $OUT/e2e_smol_${v}_$round.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/e2e_smol_${v}_$round.json'))['results']; f,q=r[0],r[1]
print('$v $round smollm2 64x8160 decode tok/s fp16 %.0f nuq3 %.0f ratio %.3f'%(f['decode_tok_s'],q['decode_tok_s'],q['decode_tok_s']/f['decode_tok_s']))" 2>&1 | tail -1
done; done
for v in main pair; do
  ab/$v/kvq bench --dummy llama3-8b --prompt-len 8160 --batch 16 --gen 16 --kv fp16,nuq3-1% --repeats 2 --warmup 1 --energy-window 0 --json $OUT/e2e_llama3_${v}.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/e2e_llama3_${v}.json'))['results']; f,q=r[0],r[1]
print('$v llama3-8b 16x8160 decode tok/s fp16 %.0f nuq3 %.0f ratio %.3f'%(f['decode_tok_s'],q['decode_tok_s'],q['decode_tok_s']/f['decode_tok_s']))" 2>&1 | tail -1
done
cd $OUT && tar czf logs.tgz *.log *.json && rm -f *.log *.json
