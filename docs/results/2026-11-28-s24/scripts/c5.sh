#!/usr/bin/env bash
# Session 24, call 5: the tree to commit (d4b0b08 + the decode-graph capture counter and its test). GPU suite and
# sanitizers; the gates on this card: prefill x fp16 over the grid, decode tok/s x fp16, decode attention vs copy.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf v3.tgz
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
v=v3
timeout 200 ab/$v/kvq_gpu_tests --gtest_output=json:$OUT/gpu_tests.json > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED) +\]" $OUT/gpu_tests.log | head -20
grep -E -B2 -A6 "Failure" $OUT/gpu_tests.log | head -30
SUBSET='QuantizedAttention.Sanitizer*:CudaKernels.SanitizerAttentionSmall:KvQuantize.SanitizerSubset:CudaBackend.DecodeGraphs*'
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 3 ab/$v/kvq_gpu_tests --gtest_filter="$SUBSET" > $OUT/san_$tool.log 2>&1
  echo "$tool rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/san_$tool.log | tail -1)"
done
e2e() {  # name, kvs, then kvq bench args
  local n=$1 kvs=$2; shift 2
  timeout 150 ab/$v/kvq bench "$@" --warmup 1 --energy-window 0 --kv $kvs --json $OUT/e2e_$n.json > $OUT/e2e_$n.log 2>&1 || echo "$n rc $?"
  python3 -c "
import json; r=json.load(open('$OUT/e2e_$n.json'))['results']
f={(q['prompt_len'],q['batch']):q for q in r if q['kv']=='fp16'}
for q in r:
    b=f[(q['prompt_len'],q['batch'])]
    if q['kv']=='fp16': continue
    d='decode x%.3f (fp16 %.0f tok/s)'%(q['decode_tok_s']/b['decode_tok_s'], b['decode_tok_s']) if b['decode_tok_s'] else ''
    print('$n', 'S=%d B=%d %-8s'%(q['prompt_len'],q['batch'],q['kv']), 'prefill x%.3f (fp16 %.4f s)'%(q['prefill_s']/b['prefill_s'], b['prefill_s']), d)" 2>&1 | tail -6
}
e2e l2_2048_r1 fp16,nuq3-1% --dummy llama2-7b --prompt-len 2048 --batch 1,4,16 --gen 1 --repeats 3
e2e sm_2048_r1 fp16,nuq3-1% --dummy smollm2-135m --prompt-len 2048 --batch 64 --gen 1 --repeats 3
e2e sm_dec fp16,nuq3-1%,nuq4-1%,q4_0,fp8 --dummy smollm2-135m --prompt-len 8160 --batch 64 --gen 16 --repeats 1
e2e l3_dec fp16,nuq3-1%,nuq4-1%,q4_0,fp8 --dummy llama3-8b --prompt-len 8160 --batch 16 --gen 16 --repeats 1
e2e l2_8192 fp16,nuq3-1% --dummy llama2-7b --prompt-len 8192 --batch 1,4 --gen 1 --repeats 2
e2e l2_long fp16,nuq3-1% --dummy llama2-7b --prompt-len 16384,32768 --batch 1 --gen 1 --repeats 1
e2e l2_2048_r2 fp16,nuq3-1% --dummy llama2-7b --prompt-len 2048 --batch 1,4,16 --gen 1 --repeats 3
e2e sm_2048_r2 fp16,nuq3-1% --dummy smollm2-135m --prompt-len 2048 --batch 64 --gen 1 --repeats 3
e2e sm_chunk16k fp16,nuq3-1% --dummy smollm2-135m --prompt-len 2048 --batch 64 --gen 1 --repeats 3 --chunk 16384
e2e l3_2048 fp16,nuq3-1% --dummy llama3-8b --prompt-len 2048 --batch 4 --gen 1 --repeats 3
timeout 60 ab/$v/kvq-gpu-bench --parts copy,qdecode --json $OUT/qdecode.json > $OUT/qdecode.log 2>&1; grep -E "copy|nuq3|nuq4|q4_0|fp8|fp16" $OUT/qdecode.log | head -20
cd $OUT && tar czf logs.tgz *.log *.json && rm -f *.log *.json
