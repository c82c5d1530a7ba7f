#!/usr/bin/env bash
# Session 19, final call: the whole GPU suite and sanitizers on the final tree (ab/final); page-kernel bench and
# decode / prefill end to end against session 18's main (ab/main), on the same card.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf ab1.tgz; rm -rf ab/new; tar xzf ab7.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
ab/final/kvq_gpu_tests --gtest_output=json:$OUT/gpu_tests.json > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?"
grep -E "^\[ +(FAILED|PASSED) +\]" $OUT/gpu_tests.log | head
SUBSET='CudaKernels.KvWrite*:CudaKernels.SanitizerAttentionSmall:QuantizedAttention.Sanitizer*:KvQuantize.SanitizerSubset'
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --error-exitcode 3 ab/final/kvq_gpu_tests --gtest_filter="$SUBSET" > $OUT/san_$tool.log 2>&1
  echo "$tool rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/san_$tool.log | tail -1)"
done
for v in main final; do ab/$v/kvq-gpu-bench --parts copy,qdecode,quantize --json $OUT/bench_$v.json 2>&1 | grep -E "^qdecode|nuq3|q4_0" | sed 's/  */ /g' | awk -v v=$v '$1=="qdecode-attn"{print v, $2, $5, $10, $11; next} {print v, $2, $3, $8, $9}' | sort -u; done
for v in main final; do
  ab/$v/kvq bench --dummy smollm2-135m --prompt-len 8160 --batch 64 --gen 16 --kv fp16,nuq3-1% --repeats 2 --warmup 1 --energy-window 0 --json $OUT/dec_smol_${v}.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/dec_smol_${v}.json'))['results']; f,q=r[0],r[1]
print('$v smollm2 64x8160 decode tok/s fp16 %.0f nuq3 %.0f ratio %.3f; prefill ratio %.4f'%(f['decode_tok_s'],q['decode_tok_s'],q['decode_tok_s']/f['decode_tok_s'],q['prefill_s']/f['prefill_s']))"
done
for n in llama2048x4 smol2048x64; do for v in main final; do
  case $n in llama*) args="--dummy llama2-7b --prompt-len 2048 --batch 4";; *) args="--dummy smollm2-135m --prompt-len 2048 --batch 64";; esac
  ab/$v/kvq bench $args --gen 1 --kv fp16,nuq3-1% --repeats 3 --warmup 1 --energy-window 0 --json $OUT/e2e_${n}_${v}.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/e2e_${n}_${v}.json'))['results']; f,q=r[0],r[1]
print('$v $n prefill_s fp16 %.4f nuq3 %.4f ratio %.4f'%(f['prefill_s'],q['prefill_s'],q['prefill_s']/f['prefill_s']))"
done; done
cd $OUT && tar czf logs.tgz *.log *.json && rm -f *.log *.json
