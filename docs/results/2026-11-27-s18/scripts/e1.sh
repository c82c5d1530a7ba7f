#!/usr/bin/env bash
# Experiment 1: where the decode page kernel's time goes (timing-only variants).
cd "$(dirname "$0")"; tar xzf exp1.tgz; export LD_LIBRARY_PATH=$PWD/lib:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for round in 1 2; do for v in base norot nolookup nopatch all; do
  echo "== $v round $round"
  v/$v/kvq-gpu-bench --parts copy,qdecode --json $OUT/${v}_$round.json 2>&1 | grep -E "qdecode-attn|decode-attn|copy" | sed 's/  */ /g'
done; done
