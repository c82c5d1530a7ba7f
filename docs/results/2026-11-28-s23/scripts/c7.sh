#!/usr/bin/env bash
# Session 23, call 7: the final tree (v6 = 8fea8b5 + the review's mends: a row's twin at head_dim 64 does not rotate
# the queries again). GPU suite and sanitizers; quantize bench; end to end prefill over the grid, fp16 and nuq3-1% in
# one kvq bench run each (most important first: the call may run out of device time).
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf v6.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
v=v6
timeout 200 ab/$v/kvq_gpu_tests --gtest_output=json:$OUT/gpu_tests.json > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED) +\]" $OUT/gpu_tests.log | head -20
grep -E -B2 -A6 "Failure" $OUT/gpu_tests.log | head -40
SUBSET='QuantizedAttention.Sanitizer*:CudaKernels.SanitizerAttentionSmall:KvQuantize.SanitizerSubset'
for tool in memcheck racecheck; do
  timeout 120 compute-sanitizer --tool $tool --error-exitcode 3 ab/$v/kvq_gpu_tests --gtest_filter="$SUBSET" > $OUT/san_$tool.log 2>&1
  echo "$tool rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/san_$tool.log | tail -1)"
done
timeout 60 ab/$v/kvq-gpu-bench --parts quantize --json $OUT/quant.json 2>&1 | grep -E "nuq3|nuq4|q4_0|int4|fp8" | sed -E 's/kv_heads.*hd=[0-9]+ +//; s/GB\/s.*page tiles too/| tiles/'
e2e() {  # name, then kvq bench args
  local n=$1; shift
  timeout 100 ab/$v/kvq bench "$@" --gen 1 --warmup 1 --energy-window 0 --kv fp16,nuq3-1% --json $OUT/e2e_$n.json > /dev/null 2>&1
  python3 -c "
import json,collections; r=json.load(open('$OUT/e2e_$n.json'))['results']
f={(q['prompt_len'],q['batch']):q['prefill_s'] for q in r if q['kv']=='fp16'}
for q in r:
    if q['kv']!='fp16': print('$n', 'S=%d B=%d'%(q['prompt_len'],q['batch']), 'fp16 %.4f s nuq3-1%% %.4f s x%.3f'%(f[(q['prompt_len'],q['batch'])], q['prefill_s'], q['prefill_s']/f[(q['prompt_len'],q['batch'])]))" 2>&1 | tail -6
}
e2e l2_2048_a --dummy llama2-7b --prompt-len 2048 --batch 4 --repeats 3
e2e sm_chunk16k --dummy smollm2-135m --prompt-len 2048 --batch 64 --repeats 3 --chunk 16384
e2e l2_2048_b --dummy llama2-7b --prompt-len 2048 --batch 1,4,16 --repeats 3
e2e sm_chunk2k --dummy smollm2-135m --prompt-len 2048 --batch 64 --repeats 3
e2e l2_8192 --dummy llama2-7b --prompt-len 8192 --batch 1,4 --repeats 3
e2e l3_2048 --dummy llama3-8b --prompt-len 2048 --batch 4 --repeats 3
e2e l2_16384 --dummy llama2-7b --prompt-len 16384 --batch 1 --repeats 1
cd $OUT && tar czf logs.tgz *.log *.json && rm -f *.log *.json
