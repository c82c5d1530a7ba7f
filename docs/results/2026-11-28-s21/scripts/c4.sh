#!/usr/bin/env bash
# Session 21, call 4: v4 = v3 + decoded rows as lo + x * span from shared tables + the nuq codes by bisection:
# GPU suite, memcheck and racecheck on v4; quantize bench (with the decoded rows) base vs v4; prefill x fp16 base /
# v3 / v4 alternating; per-kernel times and Nsight Compute source counters of kv_quantize_kernel_128 (v4).
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf base.tgz; tar xzf v34.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
timeout 300 ab/v4/kvq_gpu_tests --gtest_output=json:$OUT/gpu_tests.json > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED) +\]" $OUT/gpu_tests.log | head -20
grep -E -A3 "Failure" $OUT/gpu_tests.log | head -30
SUBSET='QuantizedAttention.Sanitizer*:CudaKernels.SanitizerAttentionSmall:KvQuantize.SanitizerSubset'
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 3 ab/v4/kvq_gpu_tests --gtest_filter="$SUBSET" > $OUT/san_$tool.log 2>&1
  echo "$tool rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/san_$tool.log | tail -1)"
done
for v in base v4; do
  timeout 120 ab/$v/kvq-gpu-bench --parts copy,quantize --json $OUT/quant_$v.json 2>&1 | grep -E "^quantize" | grep -E "nuq3|nuq4|int4" | sed 's/  */ /g' | sed "s/^/$v /"
done
e2e() {  # name, then kvq bench args
  local n=$1; shift
  timeout 100 ab/$v/kvq bench "$@" --warmup 1 --energy-window 0 --json $OUT/${n}_${v}_$r.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/${n}_${v}_$r.json'))['results']; f=r[0]
print('$v $n', ' '.join('%s prefill %.4f s x%.3f'%(q['kv'], q['prefill_s'], q['prefill_s']/f['prefill_s']) for q in r))"
}
for r in 1 2; do for v in base v3 v4; do
  e2e pre_smol --dummy smollm2-135m --prompt-len 2048 --batch 64 --gen 1 --repeats 3 --kv fp16,nuq3-1%
  e2e pre_llama2 --dummy llama2-7b --prompt-len 2048 --batch 4 --gen 1 --repeats 3 --kv fp16,nuq3-1%
done; done
kv=nuq3-1%; m=llama2-7b
timeout 120 ncu --metrics gpu__time_duration.sum --csv --print-units base ab/v4/kvq bench --dummy $m --prompt-len 2048 --batch 1 --gen 1 --repeats 1 --warmup 0 --energy-window 0 --kv $kv > /tmp/k.csv 2>/dev/null; gzip -c /tmp/k.csv > $OUT/k_llama2_v4.csv.gz
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
timeout 200 ncu -k 'regex:kv_quantize_kernel_128' --launch-skip 5 --launch-count 1 \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section InstructionStats --section Occupancy \
  --section LaunchStats --section SourceCounters -o $OUT/quant ab/v4/kvq bench --dummy llama2-7b --prompt-len 2048 --batch 1 --gen 1 --repeats 1 --warmup 0 --energy-window 0 --kv nuq3-1% > $OUT/ncu_run.log 2>&1
echo "ncu rc $?"
ncu --import $OUT/quant.ncu-rep --print-summary none > $OUT/ncu_quant.txt 2>&1
ncu --import $OUT/quant.ncu-rep --page source --print-source sass --csv > $OUT/ncu_quant_sass.csv 2>&1
grep -E "Duration|No Eligible|Eligible Warps|Executed Instructions |Registers Per|Achieved Occupancy" $OUT/ncu_quant.txt | head -12
rm -f $OUT/quant.ncu-rep
cd $OUT && tar czf logs.tgz *.log *.json *.txt *.csv && rm -f *.log *.json *.txt *.csv
