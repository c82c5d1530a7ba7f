#!/usr/bin/env bash
# Session 20, call 7: f6 (the review's mends: Δ clamped to fp16's range, the queries' rotation with explicit
# roundings, the angle table padded per t block, no calibration region for the fragment kernel): the whole GPU
# suite and sanitizers; qdecode and decode end to end against main (final).
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf main.tgz; tar xzf f6.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
timeout 300 ab/f6/kvq_gpu_tests --gtest_output=json:$OUT/gpu_tests.json > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED) +\]" $OUT/gpu_tests.log | head -20
grep -E -A2 "Failure|gpu .* cpu" $OUT/gpu_tests.log | head -20
SUBSET='QuantizedAttention.Sanitizer*:CudaKernels.SanitizerAttentionSmall:KvQuantize.SanitizerSubset'
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 3 ab/f6/kvq_gpu_tests --gtest_filter="$SUBSET" > $OUT/san_$tool.log 2>&1
  echo "$tool rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/san_$tool.log | tail -1)"
done
for round in 1 2; do for v in final f6; do
  ab/$v/kvq-gpu-bench --parts copy,qdecode --json $OUT/qd_${v}_$round.json 2>&1 | grep -E "nuq|q4_0|fp8" | sed 's/  */ /g' | awk -v v=$v '{print v, $2, $4, $6, $10, $11}' | tr '\n' ' '; echo
done; done
for v in final f6; do
  ab/$v/kvq bench --dummy smollm2-135m --prompt-len 8160 --batch 64 --gen 16 --repeats 2 --kv fp16,nuq3-1% --warmup 1 --energy-window 0 --json $OUT/dec_smol_${v}.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/dec_smol_${v}.json'))['results']; f=r[0]
print('$v dec_smol', ' '.join('%s %.0f tok/s x%.3f'%(q['kv'], q['decode_tok_s'], q['decode_tok_s']/f['decode_tok_s']) for q in r))"
done
cd $OUT && tar czf logs.tgz *.log *.json && rm -f *.log *.json
