#!/usr/bin/env bash
# Session 19, call 1: the n_sms mend and the page kernel's stages copied by the TMA (bulk copies on mbarriers):
# GPU tests, sanitizers on the attention tests, qdecode main vs new alternating, decode end to end.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf ab1.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
ab/new/kvq_gpu_tests --gtest_output=json:$OUT/gpu_tests.json > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?"
grep -E "^\[ +(FAILED|PASSED) +\]" $OUT/gpu_tests.log | head
SUBSET='QuantizedAttention.Sanitizer*:KvQuantize.SanitizerSubset'
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --error-exitcode 3 ab/new/kvq_gpu_tests --gtest_filter="$SUBSET" > $OUT/san_$tool.log 2>&1
  echo "$tool rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/san_$tool.log | tail -1)"
done
for v in main new main new; do ab/$v/kvq-gpu-bench --parts copy,qdecode --json $OUT/qdecode_$v.json 2>&1 | grep -E "^qdecode|^copy" | sed 's/  */ /g' | awk -v v=$v '{print v, $0}' | cut -c1-150; done
for round in 1 2; do for v in main new; do
  ab/$v/kvq bench --dummy smollm2-135m --prompt-len 8160 --batch 64 --gen 16 --kv fp16,nuq3-1% --repeats 2 --warmup 1 --energy-window 0 --json $OUT/e2e_smol_${v}_$round.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/e2e_smol_${v}_$round.json'))['results']; f,q=r[0],r[1]
print('$v $round smollm2 64x8160 decode tok/s fp16 %.0f nuq3 %.0f ratio %.3f'%(f['decode_tok_s'],q['decode_tok_s'],q['decode_tok_s']/f['decode_tok_s']))" 2>&1 | tail -1
done; done
cd $OUT && tar czf logs.tgz *.log *.json && rm -f *.log *.json
