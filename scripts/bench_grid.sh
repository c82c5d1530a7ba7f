#!/usr/bin/env bash
# The benchmark grid of docs/RESULTS.md (issue 7), in parts that each take a few
# minutes on an H100, so one device call runs one or two of them. Every part
# writes its JSON files to $OUT; copy them under docs/results/<date>-<card>/ and
# run `make report`.
#   scripts/bench_grid.sh PART...    parts: llama2-2048 llama2-8192 llama2-16384 llama2-32768
#                                    llama3 smollm2 ragged capacity ablations ppl (ppl: accuracy)
#   KVQ: the kvq binary (default build/kvq); FORMATS: quantized formats beside fp16;
#   GEN: tokens generated per sequence; HF=0 skips the HF transformers baseline; PPL_DEVICE: where the
#   ppl part runs (cpu, or cuda: the same perplexities in seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
KVQ=${KVQ:-build/kvq}
OUT=${OUT:-$PWD/bench-out}
FORMATS=${FORMATS:-nuq4-1%,nuq3-1%,nuq2-1%}
GEN=${GEN:-32}
HF=${HF:-1}
PPL_DEVICE=${PPL_DEVICE:-cpu}
SMOLLM2=models/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# The longest prompt that leaves room for GEN tokens in a context (kvq bench refuses a point that overruns it).
fill() { echo $(($1 - GEN + 1)); }

# ours and HF's on one grid: model, lengths, batches, name, extra kvq flags
both() {
  local model=$1 lengths=$2 batches=$3 name=$4
  shift 4
  "$KVQ" bench --device cuda --dummy "$model" --prompt-len "$lengths" --batch "$batches" --gen "$GEN" \
    --kv "fp16,$FORMATS" --json "$OUT/kvq_$name.json" "$@"
  if [ "$HF" = 1 ]; then
    local ragged=()
    [[ " $* " == *" --ragged "* ]] && ragged=(--ragged --lengths-from "$OUT/kvq_$name.json")  # the same batches
    python3 scripts/baseline_hf.py --dummy "$model" --prompt-len "$lengths" --batch "$batches" --gen "$GEN" \
      "${ragged[@]}" --json "$OUT/hf_$name.json"
  fi
}

for part in "$@"; do
  echo "== $part"
  case $part in
    # Long prompts: one repetition per window (a 32768 x 16 generation alone lasts longer than 5 s).
    llama2-2048|llama2-8192) both llama2-7b "${part#llama2-}" 1,2,4,8,16 "$part" ;;
    llama2-16384) both llama2-7b 16384 1,2,4,8,16 "$part" --repeats 1 ;;
    llama2-32768) both llama2-7b "$(fill 32768)" 1,2,4,8,16 "$part" --repeats 1 ;;
    llama3) both llama3-8b "2048,$(fill 8192)" 1,4,16 llama3 ;;
    smollm2) both smollm2-135m "2048,$(fill 8192)" 1,16,64 smollm2 --chunk 16384 ;;
    ragged) both llama2-7b 2048 4,16 llama2-ragged --ragged && both smollm2-135m 2048 64 smollm2-ragged --ragged --chunk 16384 ;;
    capacity)
      "$KVQ" bench --device cuda --dummy llama2-7b --prompt-len "2048,8192,$(fill 32768)" --gen "$GEN" --kv "fp16,$FORMATS" \
        --mem-budget 40 --repeats 1 --json "$OUT/kvq_capacity.json" ;;
    # One option varied at a time around nuq3-1% (page 64, tail on, calibrated key ranges, Fisher codebooks);
    # speed and energy on the preset of SmolLM2's shapes (the model file stays off the device).
    ablations)
      for page in 16 32 64 128 256 512 1024; do
        "$KVQ" bench --device cuda --dummy smollm2-135m --prompt-len 2048 --batch 16 --gen "$GEN" --kv nuq3-1% --page "$page" \
          --json "$OUT/ablation_page$page.json"
      done
      "$KVQ" bench --device cuda --dummy smollm2-135m --prompt-len 2048 --batch 16 --gen "$GEN" \
        --kv fp16,nuq2-1%,nuq3,nuq3-0.5%,nuq3-1%,nuq3-2%,nuq4-1%,int3 --json "$OUT/ablation_formats.json"
      "$KVQ" bench --device cuda --dummy smollm2-135m --prompt-len 2048 --batch 16 --gen "$GEN" --kv nuq3-1% --kscale page \
        --json "$OUT/ablation_kscale.json"
      "$KVQ" bench --device cuda --dummy smollm2-135m --prompt-len 2048 --batch 16 --gen "$GEN" --kv nuq3-1% --no-tail \
        --json "$OUT/ablation_notail.json" ;;
    # Accuracy of the same configurations (the CPU reference by default; calibration files of the plain-codebook
    # ablation are named *none* or *plain*, which the report reads as "plain codebooks").
    ppl)
      ppl() { "$KVQ" ppl --device "$PPL_DEVICE" -m "$SMOLLM2" -f data/evaluation.txt --ctx 2048 --max-tokens 32768 "$@"; }
      for page in 16 32 64 128 256 512 1024; do
        ppl --kv fp16,nuq3-1% --page "$page" --json "$OUT/ppl_page$page.json"
      done
      ppl --kv fp16,nuq2-1%,nuq3,nuq3-0.5%,nuq3-1%,nuq3-2%,nuq4-1%,int3 --json "$OUT/ppl_formats.json"
      ppl --kv nuq3-1% --kscale page --json "$OUT/ppl_kscale.json"
      ppl --kv nuq3-1% --no-tail --json "$OUT/ppl_notail.json"
      if [ -f calibration/SmolLM2-135M-Instruct.Q4_1.plain.calib.safetensors ]; then
        ppl --kv nuq3-1% --calib calibration/SmolLM2-135M-Instruct.Q4_1.plain.calib.safetensors \
          --json "$OUT/ppl_plain.json"
      fi ;;
    *) echo "bench_grid: unknown part '$part'" >&2; exit 2 ;;
  esac
done
