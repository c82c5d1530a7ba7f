#!/usr/bin/env bash
# Session 22, call 1: session 21's head (59d43c8, "base"): the whole GPU suite (8660645's test never ran on a GPU)
# and sanitizers; prefill x fp16 end to end at llama2-7b and smollm2 as this session's reference.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf base.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
which nsys ncu; v=base
timeout 300 ab/$v/kvq_gpu_tests --gtest_output=json:$OUT/gpu_tests.json > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED) +\]" $OUT/gpu_tests.log | head -20
grep -E -A2 "Failure" $OUT/gpu_tests.log | head -20
SUBSET='QuantizedAttention.Sanitizer*:CudaKernels.SanitizerAttentionSmall:KvQuantize.SanitizerSubset'
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 3 ab/$v/kvq_gpu_tests --gtest_filter="$SUBSET" > $OUT/san_$tool.log 2>&1
  echo "$tool rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/san_$tool.log | tail -1)"
done
e2e() {  # name, then kvq bench args
  local n=$1; shift
  ab/$v/kvq bench "$@" --warmup 1 --energy-window 0 --json $OUT/${n}_${v}.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/${n}_${v}.json'))['results']; f=r[0]
print('$v $n', ' '.join('%s prefill %.4f s x%.3f'%(q['kv'], q['prefill_s'], q['prefill_s']/f['prefill_s']) for q in r))"
}
e2e pre_llama2 --dummy llama2-7b --prompt-len 2048 --batch 4 --gen 1 --repeats 3 --kv fp16,nuq3-1%
e2e pre_smol --dummy smollm2-135m --prompt-len 2048 --batch 64 --gen 1 --repeats 3 --kv fp16,nuq3-1%
cd $OUT && tar czf logs.tgz *.log *.json && rm -f *.log *.json
