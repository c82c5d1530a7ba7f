#!/usr/bin/env bash
# Session 19, call 7: quantize-on-write's few-run CTAs with 512 threads (32 rows in flight) against 256 (rows2):
# the quantize tests, the quantize bench, smollm2 2048 x 64 prefill (one prompt a step) alternating.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf ab4.tgz; tar xzf ab5.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
ab/few512/kvq_gpu_tests --gtest_filter='KvQuantize*:CudaBackend.*' > $OUT/tests_few512.log 2>&1; echo "tests rc $?"
grep -E "^\[ +(FAILED|PASSED) +\]" $OUT/tests_few512.log | head
for v in rows2 few512; do ab/$v/kvq-gpu-bench --parts quantize 2>&1 | grep -E "nuq3|q4_0" | sed 's/  */ /g' | awk -v v=$v '{print v, $2, $3, $8, $9}'; done
for round in 1 2 3; do for v in rows2 few512; do
  ab/$v/kvq bench --dummy smollm2-135m --prompt-len 2048 --batch 64 --gen 1 --kv fp16,nuq3-1% --repeats 3 --warmup 1 --energy-window 0 --json $OUT/e2e_smol_${v}_$round.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/e2e_smol_${v}_$round.json'))['results']; f,q=r[0],r[1]
print('$v $round smol2048x64 prefill_s fp16 %.4f nuq3 %.4f ratio %.4f'%(f['prefill_s'],q['prefill_s'],q['prefill_s']/f['prefill_s']))"
done; done
cd $OUT && tar czf logs.tgz *.log *.json && rm -f *.log *.json
