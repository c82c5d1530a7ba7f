#!/usr/bin/env bash
# Session 22, call 2: what the band tiles (--tail, the calibrated formats' default: a query's own page read exactly)
# cost a prefill step: nuq3-1% with and without --tail against fp16, end to end (two rounds) and per kernel (ncu).
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf base.tgz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
v=base
e2e() {  # name, then kvq bench args
  local n=$1; shift
  ab/$v/kvq bench "$@" --warmup 1 --energy-window 0 --json $OUT/${n}.json > /dev/null 2>&1
  python3 -c "
import json; r=json.load(open('$OUT/${n}.json'))['results']; f=r[0]
print('$n', ' '.join('%s prefill %.4f s x%.3f'%(q['kv'], q['prefill_s'], q['prefill_s']/f['prefill_s']) for q in r))"
}
for round in 1 2; do
  e2e l2_tail_$round --dummy llama2-7b --prompt-len 2048 --batch 4 --gen 1 --repeats 3 --kv fp16,nuq3-1%
  e2e l2_notail_$round --dummy llama2-7b --prompt-len 2048 --batch 4 --gen 1 --repeats 3 --kv fp16,nuq3-1% --no-tail
  e2e sm_tail_$round --dummy smollm2-135m --prompt-len 2048 --batch 64 --gen 1 --repeats 3 --kv fp16,nuq3-1%
  e2e sm_notail_$round --dummy smollm2-135m --prompt-len 2048 --batch 64 --gen 1 --repeats 3 --kv fp16,nuq3-1% --no-tail
done
for t in "" "--no-tail"; do
  timeout 120 ncu --metrics gpu__time_duration.sum --csv --print-units base ab/$v/kvq bench --dummy llama2-7b --prompt-len 2048 --batch 1 --gen 1 --repeats 1 --warmup 0 --energy-window 0 --kv nuq3-1% $t > /tmp/k.csv 2>/dev/null; gzip -c /tmp/k.csv > $OUT/k_llama2_nuq3$t.csv.gz
  python3 - /tmp/k.csv "llama2 nuq3 $t" <<'PY'
import csv,sys,collections,re
rows=[r for r in csv.reader(open(sys.argv[1])) if len(r)>10]
h=rows[0]; ik=h.index("Kernel Name"); iv=h.index("Metric Value")
t=collections.Counter(); n=collections.Counter()
for r in rows[1:]:
    k=r[ik].replace('void ','').replace('kvq::cuda::','').replace('(anonymous namespace)::','').replace('<unnamed>::',''); k=re.split(r'[<(]',k)[0][:40]; t[k]+=float(r[iv].replace(',','')); n[k]+=1
tot=sum(t.values())
print("==",sys.argv[2],"kernels",sum(n.values()),"total GPU ms %.3f"%(tot/1e6))
for k,v in t.most_common(8): print("  %-40s n=%4d  %8.3f ms"%(k,n[k],v/1e6))
PY
done
cd $OUT && tar czf logs.tgz *.json && rm -f *.json
