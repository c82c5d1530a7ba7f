#!/usr/bin/env bash
# Session 24, call 1 (first H200 call): head d4b0b08 (= session 23's v6). GPU suite; per-kernel times of a 2048-token
# step fp16 vs nuq3-1% (llama2-7b, smollm2-135m); a source-level profile of kv_quantize_calibrated_128<3> with the
# queries; end to end prefill and decode at the gate points on this card.
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf base.tgz
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
v=base
timeout 200 ab/$v/kvq_gpu_tests --gtest_output=json:$OUT/gpu_tests.json > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED) +\]" $OUT/gpu_tests.log | head -20
for m in llama2-7b smollm2-135m; do for kv in fp16 nuq3-1%; do
  timeout 120 ncu --metrics gpu__time_duration.sum --csv --print-units base ab/$v/kvq bench --dummy $m --prompt-len 2048 --batch 1 --gen 1 --repeats 1 --warmup 0 --energy-window 0 --kv $kv > /tmp/k.csv 2>/dev/null
  cp /tmp/k.csv $OUT/kern_${m}_${kv}.csv
  python3 - /tmp/k.csv "$m $kv" <<'PY'
import csv,sys,collections,re
rows=[r for r in csv.reader(open(sys.argv[1])) if len(r)>10]
h=rows[0]; ik=h.index("Kernel Name"); iv=h.index("Metric Value")
t=collections.Counter()
for r in rows[1:]:
    k=r[ik].replace('void ','').replace('kvq::cuda::','').replace('(anonymous namespace)::','').replace('<unnamed>::',''); k=re.split(r'[<(]',k)[0][:34]; t[k]+=float(r[iv].replace(',',''))
print("==",sys.argv[2], "total %.3f |"%(sum(t.values())/1e6), " ".join("%s %.3f"%(k,v/1e6) for k,v in t.most_common(12)))
PY
done; done
timeout 100 ncu --kernel-name regex:kv_quantize_calibrated_128 --launch-skip 6 --launch-count 1 --set full --import-source no -f -o /tmp/q128 \
    ab/$v/kvq bench --dummy llama2-7b --prompt-len 2048 --batch 1 --gen 1 --repeats 1 --warmup 0 --energy-window 0 --kv nuq3-1% > /dev/null 2>&1
ncu -i /tmp/q128.ncu-rep --page source --csv --print-source sass | gzip > $OUT/q128_sass.csv.gz; ncu -i /tmp/q128.ncu-rep --page details --csv > $OUT/q128_details.csv
grep -E "Duration|Registers|Achieved Occupancy|Issue Slots Busy|Executed Instructions\"" $OUT/q128_details.csv | cut -c1-160 | head
e2e() {  # name, kvs, then kvq bench args
  local n=$1 kvs=$2; shift 2
  timeout 150 ab/$v/kvq bench "$@" --warmup 1 --energy-window 0 --kv $kvs --json $OUT/e2e_$n.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/e2e_$n.json'))['results']
f={(q['prompt_len'],q['batch']):q for q in r if q['kv']=='fp16'}
for q in r:
    b=f[(q['prompt_len'],q['batch'])]
    if q['kv']!='fp16': print('$n', 'S=%d B=%d %s'%(q['prompt_len'],q['batch'],q['kv']), 'prefill x%.3f (fp16 %.4f s)'%(q['prefill_s']/b['prefill_s'], b['prefill_s']), 'decode tok/s x%.3f (fp16 %.0f)'%(q.get('decode_tok_s',0)/max(b.get('decode_tok_s',1),1e-9), b.get('decode_tok_s',0)))" 2>&1 | tail -6
}
e2e l2_2048 fp16,nuq3-1% --dummy llama2-7b --prompt-len 2048 --batch 1,4,16 --gen 1 --repeats 3
e2e sm_2048 fp16,nuq3-1% --dummy smollm2-135m --prompt-len 2048 --batch 64 --gen 1 --repeats 3
e2e sm_dec fp16,nuq3-1%,nuq4-1% --dummy smollm2-135m --prompt-len 8160 --batch 64 --gen 16 --repeats 1
e2e l3_dec fp16,nuq3-1% --dummy llama3-8b --prompt-len 8160 --batch 16 --gen 16 --repeats 1
e2e l2_8192 fp16,nuq3-1% --dummy llama2-7b --prompt-len 8192 --batch 1,4 --gen 1 --repeats 2
cd $OUT && tar czf logs.tgz *.log *.json *.csv && rm -f *.log *.json kern_*.csv
