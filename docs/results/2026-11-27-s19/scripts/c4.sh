#!/usr/bin/env bash
# Session 19, call 4: consecutive write runs (no per-row list for the step's own rows): the GPU tests and
# sanitizers, quantize bench main / rows (quantize kernels bounded to 64 registers) / rowsub (unbounded),
# prefill end to end main vs rows alternating.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf ab1.tgz; mv ab/new ab/tma; tar xzf ab3.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
ab/rows/kvq_gpu_tests --gtest_output=json:$OUT/gpu_tests.json > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?"
grep -E "^\[ +(FAILED|PASSED) +\]" $OUT/gpu_tests.log | head
SUBSET='KvQuantize.SanitizerSubset:CudaKernels.KvWrite*:QuantizedAttention.Sanitizer*'
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --error-exitcode 3 ab/rows/kvq_gpu_tests --gtest_filter="$SUBSET" > $OUT/san_$tool.log 2>&1
  echo "$tool rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/san_$tool.log | tail -1)"
done
for v in main rows rowsub main rows rowsub; do ab/$v/kvq-gpu-bench --parts quantize 2>&1 | grep -E "nuq3|q4_0|fp8" | sed 's/  */ /g' | awk -v v=$v '{print v, $2, $3, $8, $9}'; done
run() {  # name, kvq args
  local n=$1; shift
  for round in 1 2; do for v in main rows; do
    ab/$v/kvq bench "$@" --gen 1 --kv fp16,nuq3-1% --repeats 3 --warmup 1 --energy-window 0 --json $OUT/e2e_${n}_${v}_$round.json > /dev/null 2>&1
    python3 -c "
import json; r=json.load(open('$OUT/e2e_${n}_${v}_$round.json'))['results']; f,q=r[0],r[1]
print('$v $round $n prefill_s fp16 %.4f nuq3 %.4f ratio %.4f'%(f['prefill_s'],q['prefill_s'],q['prefill_s']/f['prefill_s']))"
  done; done
}
run smol2048x64 --dummy smollm2-135m --prompt-len 2048 --batch 64
run llama2048x4 --dummy llama2-7b --prompt-len 2048 --batch 4
run llama8192x1 --dummy llama2-7b --prompt-len 8192 --batch 1
cd $OUT && tar czf logs.tgz *.log *.json && rm -f *.log *.json
