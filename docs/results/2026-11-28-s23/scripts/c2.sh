#!/usr/bin/env bash
# Session 23, call 2: v1 (int/nuq quantize-on-write in one pass, its own kernels per bits; explicit rotate_pair) against
# base (928382d). GPU suite and sanitizers on v1; quantize bench, per kernel (ncu) and end to end, alternating.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; for v in base v1; do tar xzf $v.tgz; done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
v=v1
timeout 300 ab/$v/kvq_gpu_tests --gtest_output=json:$OUT/gpu_tests.json > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED) +\]" $OUT/gpu_tests.log | head -20
grep -E -B2 -A6 "Failure" $OUT/gpu_tests.log | head -60
SUBSET='QuantizedAttention.Sanitizer*:CudaKernels.SanitizerAttentionSmall:KvQuantize.SanitizerSubset'
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 3 ab/$v/kvq_gpu_tests --gtest_filter="$SUBSET" > $OUT/san_$tool.log 2>&1
  echo "$tool rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/san_$tool.log | tail -1)"
done
for v in base v1 base v1; do
  timeout 100 ab/$v/kvq-gpu-bench --parts quantize --json $OUT/quant_$v.json 2>&1 | grep -E "nuq3|nuq4|q4_0|int4|fp8" | sed "s/^/$v /"
done
for v in base v1; do for m in llama2-7b smollm2-135m; do
  timeout 120 ncu --metrics gpu__time_duration.sum --csv --print-units base ab/$v/kvq bench --dummy $m --prompt-len 2048 --batch 1 --gen 1 --repeats 1 --warmup 0 --energy-window 0 --kv nuq3-1% > /tmp/k.csv 2>/dev/null
  python3 - /tmp/k.csv "$m nuq3 $v" <<'PY'
import csv,sys,collections,re
rows=[r for r in csv.reader(open(sys.argv[1])) if len(r)>10]
h=rows[0]; ik=h.index("Kernel Name"); iv=h.index("Metric Value")
t=collections.Counter()
for r in rows[1:]:
    k=r[ik].replace('void ','').replace('kvq::cuda::','').replace('(anonymous namespace)::','').replace('<unnamed>::',''); k=re.split(r'[<(]',k)[0][:40]; t[k]+=float(r[iv].replace(',',''))
print("==",sys.argv[2], " ".join("%s %.3f"%(k,v/1e6) for k,v in t.most_common(14) if re.search('quantize|attention|rope|scratch',k)))
PY
done; done
e2e() {  # name, then kvq bench args
  local n=$1; shift
  ab/$v/kvq bench "$@" --warmup 1 --energy-window 0 --json $OUT/${n}_${v}.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/${n}_${v}.json'))['results']; f=r[0]
print('$v $n', ' '.join('%s prefill %.4f s x%.3f'%(q['kv'], q['prefill_s'], q['prefill_s']/f['prefill_s']) for q in r))"
}
for round in 1 2 3; do for v in base v1; do
  e2e l2_$round --dummy llama2-7b --prompt-len 2048 --batch 4 --gen 1 --repeats 3 --kv fp16,nuq3-1%
done; done
for round in 1 2; do for v in base v1; do
  e2e sm_$round --dummy smollm2-135m --prompt-len 2048 --batch 64 --gen 1 --repeats 3 --kv fp16,nuq3-1%
done; done
cd $OUT && tar czf logs.tgz *.log *.json && rm -f *.log *.json
