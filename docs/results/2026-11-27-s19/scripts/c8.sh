#!/usr/bin/env bash
# Session 19, call 9: the queries of pre-RoPE formats rotated by the quantize launch's value runs (QueryRope)
# instead of a separate launch on the side stream: the whole GPU suite and sanitizers on it (ab/fused), then
# prefill and decode end to end against the tree before it (ab/final, call 8's), alternating.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf ab7.tgz; tar xzf ab8.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
ab/fused/kvq_gpu_tests --gtest_output=json:$OUT/gpu_tests.json > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED) +\]|RotatesEvery" $OUT/gpu_tests.log | head
SUBSET='CudaKernels.KvWrite*:QuantizedAttention.Sanitizer*:KvQuantize.SanitizerSubset:KvQuantize.RotatesEveryQueryOnceAsTheCpu'
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --error-exitcode 3 ab/fused/kvq_gpu_tests --gtest_filter="$SUBSET" > $OUT/san_$tool.log 2>&1
  echo "$tool rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/san_$tool.log | tail -1)"
done
for v in final fused; do ab/$v/kvq-gpu-bench --parts quantize 2>&1 | grep -E "nuq3" | sed 's/  */ /g' | awk -v v=$v '{print v, $2, $3, $8, $9}'; done
e2e() {  # name, then kvq bench args
  local n=$1; shift
  ab/$v/kvq bench "$@" --kv fp16,nuq3-1% --warmup 1 --energy-window 0 --json $OUT/${n}_${v}_$round.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/${n}_${v}_$round.json'))['results']; f,q=r[0],r[1]
d = ' decode x fp16 %.3f'%(q['decode_tok_s']/f['decode_tok_s']) if f['decode_tok_s'] else ''
print('$v $round $n prefill x fp16 %.4f'%(q['prefill_s']/f['prefill_s']) + d)"
}
for round in 1 2; do for v in final fused; do
  e2e smol2048x64 --dummy smollm2-135m --prompt-len 2048 --batch 64 --gen 1 --repeats 3
done; done
round=1; for v in final fused; do
  e2e llama2048x4 --dummy llama2-7b --prompt-len 2048 --batch 4 --gen 1 --repeats 3
  e2e smol8160x64 --dummy smollm2-135m --prompt-len 8160 --batch 64 --gen 16 --repeats 2
done
cd $OUT && tar czf logs.tgz *.log *.json && rm -f *.log *.json
