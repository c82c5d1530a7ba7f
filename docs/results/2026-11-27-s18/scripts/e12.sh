#!/usr/bin/env bash
# Quantize-on-write with 256 threads a CTA (8 warps) against main's 128: small steps, the big bench, tests.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf ab3.tgz
nvidia-smi --query-gpu=name --format=csv,noheader
for v in old q256 old q256; do ab/$v/kvq-gpu-bench --parts quantize 2>&1 | grep -E "nuq3|nuq4|q4_0|fp8" | sed 's/  */ /g' | awk -v v=$v '{print v, $2, $3, $9, $10}'; done
for v in old q256; do for m in smollm2-135m llama2-7b; do
  ncu --kernel-name regex:kv_quantize --metrics gpu__time_duration.sum --csv --print-units base ab/$v/kvq bench --dummy $m --prompt-len 2048 --batch 1 --gen 1 --repeats 1 --warmup 0 --energy-window 0 --kv nuq3-1% 2>/dev/null \
   | python3 -c "import csv,sys; r=[x for x in csv.reader(sys.stdin) if len(x)>10]; i=r[0].index('Metric Value'); t=[float(x[i].replace(',','')) for x in r[1:]]; print('$v $m quantize launches', len(t), 'mean us %.1f'%(sum(t)/len(t)/1e3))"
done; done
for round in 1 2; do for v in old q256; do
  ab/$v/kvq bench --dummy smollm2-135m --prompt-len 2048 --batch 64 --gen 1 --kv fp16,nuq3-1% --repeats 3 --warmup 1 --energy-window 0 --json $OUT/e2e_smol_${v}_$round.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/e2e_smol_${v}_$round.json'))['results']; f,q=r[0],r[1]
print('$v $round smollm2 64x2048 prefill_s fp16 %.4f nuq3 %.4f ratio %.4f'%(f['prefill_s'],q['prefill_s'],q['prefill_s']/f['prefill_s']))"
done; done
ab/q256/kvq_gpu_tests --gtest_filter='KvQuantize*:CudaBackend.*' > $OUT/tests_q256.log 2>&1; echo "tests rc $?"
grep -E "^\[ +(OK|FAILED|PASSED) +\]" $OUT/tests_q256.log | head -20
