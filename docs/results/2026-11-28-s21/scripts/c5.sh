#!/usr/bin/env bash
# Session 21, call 5: v5 = v4 with the nuq codes counted again (no bisection), v6 = v5 with kv_quantize_kernel_128
# unbounded (87 registers): GPU suite and sanitizers on v5; quantize bench base / v4 / v5 / v6; prefill x fp16
# base / v5 alternating.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf base.tgz; tar xzf v456.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
timeout 300 ab/v5/kvq_gpu_tests --gtest_output=json:$OUT/gpu_tests.json > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED) +\]" $OUT/gpu_tests.log | head -20
grep -E -A3 "Failure" $OUT/gpu_tests.log | head -30
SUBSET='QuantizedAttention.Sanitizer*:CudaKernels.SanitizerAttentionSmall:KvQuantize.SanitizerSubset'
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 3 ab/v5/kvq_gpu_tests --gtest_filter="$SUBSET" > $OUT/san_$tool.log 2>&1
  echo "$tool rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/san_$tool.log | tail -1)"
done
for v in base v4 v5 v6; do
  timeout 120 ab/$v/kvq-gpu-bench --parts copy,quantize --json $OUT/quant_$v.json 2>&1 | grep -E "^quantize" | grep -E "nuq3|nuq4" | sed 's/  */ /g' | sed "s/^/$v /"
done
e2e() {  # name, then kvq bench args
  local n=$1; shift
  timeout 100 ab/$v/kvq bench "$@" --warmup 1 --energy-window 0 --json $OUT/${n}_${v}_$r.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/${n}_${v}_$r.json'))['results']; f=r[0]
print('$v $n', ' '.join('%s prefill %.4f s x%.3f'%(q['kv'], q['prefill_s'], q['prefill_s']/f['prefill_s']) for q in r))"
}
for r in 1 2 3; do for v in base v5; do
  e2e pre_smol --dummy smollm2-135m --prompt-len 2048 --batch 64 --gen 1 --repeats 3 --kv fp16,nuq3-1%
  e2e pre_llama2 --dummy llama2-7b --prompt-len 2048 --batch 4 --gen 1 --repeats 3 --kv fp16,nuq3-1%
done; done
cd $OUT && tar czf logs.tgz *.log *.json && rm -f *.log *.json
