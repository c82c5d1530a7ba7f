#!/usr/bin/env bash
# The GPU check, one device call: build (or use binaries carried in
# .gpu-carry/), run the gpu-labelled tests, compute-sanitizer memcheck and
# racecheck on a small kernel subset, kvq-gpu-bench and the torch/HF baselines
# on the same card; print a short table last and write JSON and logs to $OUT.
#   GPU_CHECK_PARTS=tests,sanitize,bench,baseline (default: all)
#   GPU_BENCH_ARGS / GPU_BASELINE_ARGS: extra arguments for the two benchmarks
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PARTS=${GPU_CHECK_PARTS:-tests,sanitize,bench,baseline}
export PYTHONUNBUFFERED=1
status=0

if [ -x .gpu-carry/kvq_gpu_tests ]; then
  TESTS=.gpu-carry/kvq_gpu_tests BENCH=.gpu-carry/kvq-gpu-bench
  export LD_LIBRARY_PATH=$PWD/.gpu-carry/lib:${LD_LIBRARY_PATH:-}
else
  cmake --preset release >/dev/null && cmake --build build -j "$(nproc)" --target kvq_gpu_tests kvq-gpu-bench || exit 1
  TESTS=build/tests/kvq_gpu_tests BENCH=build/kvq-gpu-bench
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"

has() { [[ ",$PARTS," == *",$1,"* ]]; }
if has tests; then
  "$TESTS" --gtest_output=json:"$OUT/gpu_tests.json" >"$OUT/gpu_tests.log" 2>&1 || status=1
  grep -E "^\[ +(OK|FAILED|SKIPPED|PASSED) +\]|info \]|Failure|error" "$OUT/gpu_tests.log" | head -60
fi
if has sanitize; then
  SUBSET='CudaKernels.Embedding*:CudaKernels.RmsNorm*:CudaKernels.Swiglu*:CudaKernels.KvWrite*:CudaKernels.SanitizerAttentionSmall'
  SUBSET+=':QuantizedAttention.Sanitizer*'  # the quantized decode and prefill kernels
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 3 "$TESTS" --gtest_filter="$SUBSET" >"$OUT/sanitize_$tool.log" 2>&1
    rc=$?; echo "compute-sanitizer $tool: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -1)"
    [ $rc -eq 0 ] || status=1
  done
fi
if has bench; then
  "$BENCH" --json "$OUT/bench.json" ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" || status=1
fi
if has baseline; then
  python3 scripts/baseline_torch.py --json "$OUT/baseline.json" ${GPU_BASELINE_ARGS:-} 2>&1 | tee "$OUT/baseline.log" || status=1
fi

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else {}
ours, base = load("bench.json"), load("baseline.json")
if ours:
    print(f"\n== {ours.get('device')} {ours.get('date')}: kvq copy {ours.get('copy_gb_s', 0):.0f} GB/s, torch copy {base.get('copy_gb_s', 0):.0f} GB/s")
    sd = {(r["shape"], r["seq_len"]): r for r in base.get("sdpa_prefill", [])}
    print("prefill attention      S      B  kvq TFLOP/s  SDPA TFLOP/s  ratio")
    for r in ours.get("prefill_attention", []):
        b = sd.get((r["shape"], r["seq_len"]))
        bt = b["tflops"] if b else float("nan")
        print(f"  {r['shape']:12s} {r['seq_len']:6d} {r['batch']:4d} {r['tflops']:10.1f} {bt:12.1f} {r['tflops']/bt:7.2f}")
    dd = {(r["model"], r["batch"], r["context"]): r for r in base.get("sdpa_decode", [])}
    print("decode attention             B    ctx  kvq GB/s (%copy)  SDPA GB/s (%copy)")
    for r in ours.get("decode_attention", []):
        b = dd.get((r["model"], r["batch"], r["context"]), {})
        print(f"  {r['model']:13s} {r['shape']:11s} {r['batch']:3d} {r['context']:6d} {r['gb_s']:8.0f} ({100*r['fraction_of_copy']:3.0f}%) "
              f"{b.get('gb_s', float('nan')):9.0f} ({100*b.get('fraction_of_copy', float('nan')):3.0f}%)")
    if ours.get("quantized_decode_attention"):
        print("quantized decode attention   kv        B    ctx      ms  GB/s (%copy)  vs fp16 pages")
        for r in ours["quantized_decode_attention"]:
            print(f"  {r['model']:13s} {r['shape']:11s} {r['kv']:8s} {r['batch']:3d} {r['context']:6d} {r['ms']:7.3f} "
                  f"{r['gb_s']:5.0f} ({100*r['fraction_of_copy']:3.0f}%)  {r['speedup_vs_fp16']:5.2f}x")
    if ours.get("quantized_prefill_attention"):
        print("quantized prefill attention  kv            B      S      ms  vs fp16 pages")
        for r in ours["quantized_prefill_attention"]:
            print(f"  {r['model']:13s} {r['shape']:11s} {r['kv']:12s} {r['batch']:3d} {r['seq_len']:6d} {r['ms']:7.3f}  "
                  f"{r['ratio_vs_fp16']:5.2f}x time")
    hf = {(r["model"], r["prompt_len"], r["batch"], r["ragged"]): r for r in base.get("hf_prefill", [])}
    print("end to end                    L    B  kind     kvq tok/s    HF tok/s  ratio")
    for r in ours.get("e2e", []):
        if r["mode"] == "prefill":
            b = hf.get((r["model"], r["prompt_len"], r["batch"], r["ragged"]))
            bt = b["prefill_tok_s"] if b else float("nan")
            kind = "ragged" if r["ragged"] else "full"
            print(f"  prefill {r['model']:13s} {r['prompt_len']:5d} {r['batch']:4d}  {kind:7s} {r['prefill_tok_s']:10.0f} {bt:11.0f} {r['prefill_tok_s']/bt:6.2f}")
        else:
            print(f"  decode  {r['model']:13s} ctx {r['context']:5d} B {r['batch']:3d}  {r['decode_tok_s']:10.0f} tok/s")
PY
echo "gpu_check: exit $status"
exit $status
