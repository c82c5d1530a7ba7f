#!/usr/bin/env bash
# Per-kernel GPU time of one smollm2 2048-token prefill step, fp16 vs nuq3-1% (main's binary).
cd "$(dirname "$0")"; export LD_LIBRARY_PATH=$PWD/lib; tar xzf lib.tgz; tar xzf ab2.tgz
for kv in fp16 nuq3-1%; do
  ncu --metrics gpu__time_duration.sum --csv --print-units base ab/old/kvq bench --dummy smollm2-135m --prompt-len 2048 --batch 1 --gen 1 --repeats 1 --warmup 0 --energy-window 0 --kv $kv > /tmp/k_$kv.csv 2>/dev/null; gzip -c /tmp/k_$kv.csv > $OUT/k_${kv%%-*}.csv.gz
  python3 - /tmp/k_$kv.csv $kv <<'PY'
import csv,sys,collections,re
rows=[r for r in csv.reader(open(sys.argv[1])) if len(r)>10]
h=rows[0]; ik=h.index("Kernel Name"); iv=h.index("Metric Value")
t=collections.Counter(); n=collections.Counter()
for r in rows[1:]:
    k=r[ik].replace('void ','').replace('kvq::cuda::','').replace('(anonymous namespace)::','').replace('<unnamed>::',''); k=re.split(r'[<(]',k)[0][:40]; t[k]+=float(r[iv].replace(',','')); n[k]+=1
tot=sum(t.values())
print("==",sys.argv[2],"kernels",sum(n.values()),"total GPU ms %.3f"%(tot/1e6))
for k,v in t.most_common(14): print("  %-40s n=%4d  %8.3f ms"%(k,n[k],v/1e6))
PY
done
