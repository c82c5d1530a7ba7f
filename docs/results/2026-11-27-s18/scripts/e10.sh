#!/usr/bin/env bash
# Spans of 16 rows (a thread a row) with the per-row slot lookup, against main and spans of 64.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf ab2.tgz
nvidia-smi --query-gpu=name --format=csv,noheader
for v in old new new16; do ab/$v/kvq-gpu-bench --parts qprefill --json $OUT/qprefill_$v.json > /dev/null 2>&1; done
for round in 1 2; do for v in old new new16; do
  for m in "llama2-7b --prompt-len 2048 --batch 4" "smollm2-135m --prompt-len 2048 --batch 64"; do
    n=$(echo $m | cut -c1-6)
    ab/$v/kvq bench --dummy $m --gen 1 --kv fp16,nuq3-1% --repeats 3 --warmup 1 --energy-window 0 --json $OUT/e2e_${n}_${v}_$round.json > /dev/null 2>&1
    python3 -c "
import json; r=json.load(open('$OUT/e2e_${n}_${v}_$round.json'))['results']; f,q=r[0],r[1]
print('$v $round $n fp16 %.4f nuq3 %.4f ratio %.4f'%(f['prefill_s'],q['prefill_s'],q['prefill_s']/f['prefill_s']))"
  done
done; done
ab/new16/kvq_gpu_tests --gtest_filter='QuantizedAttention.PrefillKernelMatchesCpuTwin:QuantizedAttention.PageScratch*' 2>&1 | grep -E "^\[ +(OK|FAILED|PASSED)"
