#!/usr/bin/env bash
# Session 20, call 6: f5 (f4 + the split planner sized for the fragment kernel's 5 resident blocks at head_dim 64):
# the whole GPU suite and sanitizers; qdecode against main (final) and f4; decode and prefill end to end vs main.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf main.tgz; tar xzf f5.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
timeout 300 ab/f5/kvq_gpu_tests --gtest_output=json:$OUT/gpu_tests.json > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED) +\]" $OUT/gpu_tests.log | head -20
grep -E -A2 "Failure|gpu .* cpu" $OUT/gpu_tests.log | head -20
SUBSET='QuantizedAttention.Sanitizer*:CudaKernels.SanitizerAttentionSmall:KvQuantize.SanitizerSubset'
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 3 ab/f5/kvq_gpu_tests --gtest_filter="$SUBSET" > $OUT/san_$tool.log 2>&1
  echo "$tool rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/san_$tool.log | tail -1)"
done
for round in 1 2; do for v in final f4 f5; do
  ab/$v/kvq-gpu-bench --parts copy,qdecode --json $OUT/qd_${v}_$round.json 2>&1 | grep -E "nuq|q4_0|fp8" | sed 's/  */ /g' | awk -v v=$v '{print v, $2, $4, $6, $10, $11}' | tr '\n' ' '; echo
done; done
e2e() {  # name, then kvq bench args
  local n=$1; shift
  ab/$v/kvq bench "$@" --warmup 1 --energy-window 0 --json $OUT/${n}_${v}.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/${n}_${v}.json'))['results']; f=r[0]
print('$v $n', ' '.join('%s %.0f tok/s x%.3f prefill x%.3f'%(q['kv'], q['decode_tok_s'] or 0, (q['decode_tok_s'] or 0)/(f['decode_tok_s'] or 1), q['prefill_s']/f['prefill_s']) for q in r))"
}
for v in final f5; do
  e2e dec_smol --dummy smollm2-135m --prompt-len 8160 --batch 64 --gen 16 --repeats 2 --kv fp16,nuq3-1%,nuq4-1%,q4_0,fp8
  e2e dec_llama3 --dummy llama3-8b --prompt-len 8160 --batch 16 --gen 16 --repeats 2 --kv fp16,nuq3-1%,nuq4-1%,q4_0,fp8
  e2e pre_smol --dummy smollm2-135m --prompt-len 2048 --batch 64 --gen 1 --repeats 3 --kv fp16,nuq3-1%
  e2e pre_llama2 --dummy llama2-7b --prompt-len 2048 --batch 4 --gen 1 --repeats 3 --kv fp16,nuq3-1%
done
cd $OUT && tar czf logs.tgz *.log *.json && rm -f *.log *.json
