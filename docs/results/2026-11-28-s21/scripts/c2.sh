#!/usr/bin/env bash
# Session 21, call 2: quantize-on-write stores the step's own page-scratch rows decoded (v1: kv_quantize_kernel_128
# unbounded, 72 registers; v2: bounded to 8 blocks, 62): GPU suite and sanitizers on v2; prefill x fp16 end to end
# base / v1 / v2 alternating; per-kernel GPU time of one llama2-7b 2048-token step (v2).
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf base.tgz; tar xzf v12.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
timeout 300 ab/v2/kvq_gpu_tests --gtest_output=json:$OUT/gpu_tests.json > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED) +\]" $OUT/gpu_tests.log | head -20
grep -E -A3 "Failure" $OUT/gpu_tests.log | head -30
SUBSET='QuantizedAttention.Sanitizer*:CudaKernels.SanitizerAttentionSmall:KvQuantize.SanitizerSubset'
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 ab/v2/kvq_gpu_tests --gtest_filter="$SUBSET" > $OUT/san_memcheck.log 2>&1
echo "memcheck rc $? $(grep -E 'ERROR SUMMARY' $OUT/san_memcheck.log | tail -1)"
e2e() {  # name, then kvq bench args
  local n=$1; shift
  timeout 100 ab/$v/kvq bench "$@" --warmup 1 --energy-window 0 --json $OUT/${n}_${v}_$r.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/${n}_${v}_$r.json'))['results']; f=r[0]
print('$v $n', ' '.join('%s prefill %.4f s x%.3f'%(q['kv'], q['prefill_s'], q['prefill_s']/f['prefill_s']) for q in r))"
}
for r in 1 2; do for v in base v1 v2; do
  e2e pre_smol --dummy smollm2-135m --prompt-len 2048 --batch 64 --gen 1 --repeats 3 --kv fp16,nuq3-1%
  e2e pre_llama2 --dummy llama2-7b --prompt-len 2048 --batch 4 --gen 1 --repeats 3 --kv fp16,nuq3-1%
done; done
for m in llama2-7b smollm2-135m; do kv=nuq3-1%
  timeout 120 ncu --metrics gpu__time_duration.sum --csv --print-units base ab/v2/kvq bench --dummy $m --prompt-len 2048 --batch 1 --gen 1 --repeats 1 --warmup 0 --energy-window 0 --kv $kv > /tmp/k.csv 2>/dev/null; gzip -c /tmp/k.csv > $OUT/k_${m%%-*}_v2.csv.gz
  python3 - /tmp/k.csv "$m $kv" <<'PY'
import csv,sys,collections,re
rows=[r for r in csv.reader(open(sys.argv[1])) if len(r)>10]
h=rows[0]; ik=h.index("Kernel Name"); iv=h.index("Metric Value")
t=collections.Counter(); n=collections.Counter()
for r in rows[1:]:
    k=r[ik].replace('void ','').replace('kvq::cuda::','').replace('(anonymous namespace)::','').replace('<unnamed>::',''); k=re.split(r'[<(]',k)[0][:40]; t[k]+=float(r[iv].replace(',','')); n[k]+=1
print("==",sys.argv[2],"kernels",sum(n.values()),"total GPU ms %.3f"%(sum(t.values())/1e6))
for k,v in t.most_common(12):
    if 'fill_uniform' not in k and 'nvjet' not in k: print("  %-40s n=%4d  %8.3f ms"%(k,n[k],v/1e6))
PY
done
cd $OUT && tar czf logs.tgz *.log *.json && rm -f *.log *.json
