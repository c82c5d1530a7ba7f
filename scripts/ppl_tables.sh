#!/usr/bin/env bash
# Issue 3's perplexity tables: `kvq ppl` on the first 32768 tokens of the
# evaluation split at ctx 2048 for every format, then the ablations, one
# process per run, JOBS at a time (one thread each), JSON per run in OUT_DIR,
# and a markdown table from scripts/ppl_report.py last.
#   scripts/ppl_tables.sh OUT_DIR [JOBS] [GROUPS]
#   GROUPS: comma list of main,tail,ablations (default all)
#   KVQ (default build/kvq), CALIB (default: the model's), CALIB_NONE (a --sensitivity none file)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/ppl_tables.sh OUT_DIR [JOBS] [GROUPS]}
jobs=${2:-$(nproc)}
groups=${3:-main,tail,ablations}
kvq=${KVQ:-build/kvq}
calib=${CALIB:-models/SmolLM2-135M-Instruct.Q4_1.calib.safetensors}
calib_none=${CALIB_NONE:-}
mkdir -p "$out"

runs=()  # "name|extra arguments"
if [[ ",$groups," == *",main,"* ]]; then
  for kv in fp16 int4 nuq4 nuq4-1% q4_0 kivi4 fp8 q8_0 int3 nuq3 nuq3-1% int2 nuq2-1% kivi2; do
    runs+=("$kv|--kv $kv")
  done
fi
if [[ ",$groups," == *",tail,"* ]]; then
  for kv in int4 nuq4 nuq4-1% int3 nuq3 nuq3-1% int2 nuq2-1%; do runs+=("$kv tail|--kv $kv --tail"); done
fi
if [[ ",$groups," == *",ablations,"* ]]; then
  for kv in nuq3-1% nuq2-1%; do
    for tail in "" " --tail"; do
      [ -n "$calib_none" ] && runs+=("$kv sensitivity-none$tail|--kv $kv --calib $calib_none$tail")
      runs+=("$kv exact-chunk$tail|--kv $kv --exact-chunk$tail")
    done
    runs+=("$kv kscale-page|--kv $kv --kscale page")
  done
fi

run_one() {
  local name=${1%%|*} args=${1#*|}
  local file="$out/$(echo "$name" | tr ' %' '_p').json"
  [[ " $args " == *" --calib "* ]] || args="$args --calib $calib"
  # shellcheck disable=SC2086
  "$kvq" ppl -f data/evaluation.txt --ctx 2048 --max-tokens 32768 --threads 1 $args \
    --json "$file" >"${file%.json}.log" 2>&1 && echo "done: $name" || echo "FAILED: $name (see ${file%.json}.log)"
}
export -f run_one
export out kvq calib
printf '%s\n' "${runs[@]}" | xargs -P "$jobs" -I{} bash -c 'run_one "$@"' _ {}
python3 scripts/ppl_report.py "$out"
