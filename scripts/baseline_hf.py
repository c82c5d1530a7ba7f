#!/usr/bin/env python3
"""HF transformers fp16 beside `kvq bench`: the same grid (prompt lengths x
batches, --gen tokens per sequence, --ragged lengths uniform in [L/4, L]) on
the --dummy presets' configs with random weights, timed and measured the same
way (warm-up, median of repeats, peak device memory in use, NVML energy over
windows of at least --energy-window seconds) and written in kvq bench's JSON
schema (DESIGN.md), with kv = "hf-fp16", so every plot of scripts/report.py
shows both. Prefill is one forward of the padded batch (sdpa attention,
logits_to_keep=1: HF left-pads a ragged batch, as its generate() does); decode
feeds the argmax token back through the DynamicCache, --gen - 1 steps.

    python3 scripts/baseline_hf.py --dummy llama2-7b --prompt-len 2048 --batch 1,4 --gen 32 --json out.json
"""
import argparse
import csv
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time

PRESETS = {
    "smollm2-135m": dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "llama2-7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, head_dim=128, vocab_size=32000, max_position_embeddings=32768,
                      rope_theta=10000.0, tie_word_embeddings=False),
    "llama3-8b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=False),
}
KV_NAME = "hf-fp16"


def build_model(preset, seed=0):
    """LlamaForCausalLM of a preset's config, random fp16 weights on the GPU, sdpa attention."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(rms_norm_eps=1e-5, attn_implementation="sdpa", **PRESETS[preset])
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model


class NvmlEnergy:
    """NVML's total-energy counter (mJ) through ctypes; `status` is "ok" or "unsupported: why"."""

    def __init__(self, pci_bus_id=None):
        self.status, self.lib, self.handle = "ok", None, ctypes.c_void_p()
        try:
            self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError as e:
            self.status = f"unsupported: cannot load libnvidia-ml.so.1: {e}"
            return
        if self.lib.nvmlInit_v2() != 0:
            self.status = "unsupported: nvmlInit_v2 failed"
            return
        code = 1
        if pci_bus_id:
            code = self.lib.nvmlDeviceGetHandleByPciBusId_v2(pci_bus_id.encode(), ctypes.byref(self.handle))
        if code != 0:
            code = self.lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self.handle))
        if code != 0:
            self.status = f"unsupported: no NVML device handle (NVML error {code})"
            return
        self.read_mj()

    def read_mj(self):
        if self.status != "ok":
            return None
        value = ctypes.c_ulonglong()
        code = self.lib.nvmlDeviceGetTotalEnergyConsumption(self.handle, ctypes.byref(value))
        if code != 0:
            self.status = f"unsupported: nvmlDeviceGetTotalEnergyConsumption failed (NVML error {code})"
            return None
        return value.value


def energy_window(once, energy, min_seconds, min_repetitions, max_repetitions=100000):
    """Runs once() at least min_repetitions times and, with a readable counter,
    until min_seconds have passed; returns (seconds, repetitions, joules or None)."""
    start_mj, start = energy.read_mj(), time.perf_counter()
    repetitions, seconds = 0, 0.0
    while repetitions < max(min_repetitions, 1) or (start_mj is not None and seconds < min_seconds
                                                     and repetitions < max_repetitions):
        once()
        repetitions += 1
        seconds = time.perf_counter() - start
    end_mj = energy.read_mj()
    joules = (end_mj - start_mj) / 1000.0 if start_mj is not None and end_mj is not None else None
    return seconds, repetitions, joules


def cache_bytes(cache):
    """Bytes of the keys and values a transformers cache holds (5.x layers, or 4.x key_cache/value_cache)."""
    if hasattr(cache, "layers"):
        tensors = [t for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
    else:
        tensors = list(cache.key_cache) + list(cache.value_cache)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def sdpa_backends(model, vocab):
    """The kernels one small forward launches, naming the SDPA backend that ran."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    ids = torch.randint(0, vocab, (1, 256), device="cuda")
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(input_ids=ids, logits_to_keep=1)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if e.device_time_total > 0}
    return sorted(n for n in names if any(k in n.lower() for k in ("flash", "fmha", "attention", "cudnn", "efficient")))


def measure_point(model, preset, length, batch, args, energy, generator):
    import torch
    config = PRESETS[preset]
    point = dict(kv=KV_NAME, prompt_len=length, batch=batch, gen=args.gen, page=None, ragged=args.ragged)
    lengths = [length] * batch
    if args.ragged and (length, batch) in args.kvq_lengths:
        lengths = args.kvq_lengths[length, batch]
    elif args.ragged:
        lengths = torch.randint(max(1, length // 4), length + 1, (batch,), generator=generator).tolist()
    prompt_tokens = sum(lengths)
    decode_tokens = batch * (args.gen - 1)
    point["prompt_tokens"] = prompt_tokens
    point["prompt_lengths"] = lengths
    if length + args.gen - 1 > config["max_position_embeddings"]:  # as kvq bench: the last token is not fed back
        point["status"] = (f"prompt length {length} + {args.gen} generated tokens exceeds the model's context of "
                           f"{config['max_position_embeddings']}")
        return point
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, config["vocab_size"], (batch, length), device="cuda")
    mask = torch.zeros(batch, length, dtype=torch.long, device="cuda")
    for i, n in enumerate(lengths):
        mask[i, length - n:] = 1  # left padding, as HF batches prompts for generation
    timings = dict(prefill=[], decode=[])
    state = {}

    def generate(gen, record):
        with torch.inference_mode():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            cache, step_mask = out.past_key_values, mask
            for _ in range(gen - 1):
                step_mask = torch.cat([step_mask, step_mask.new_ones(batch, 1)], dim=1)
                out = model(input_ids=token, attention_mask=step_mask, past_key_values=cache, use_cache=True,
                            logits_to_keep=1)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
        if record:
            timings["prefill"].append(t1 - t0)
            timings["decode"].append(t2 - t1)
            state["kv_bytes"] = cache_bytes(cache)
        del out, cache

    use_energy = energy.status == "ok" and args.energy_window > 0
    try:
        for _ in range(args.warmup):
            generate(args.gen, False)
        seconds, repetitions, joules = energy_window(lambda: generate(args.gen, True), energy,
                                                     args.energy_window if use_energy else 0, args.repeats)
        free, total = torch.cuda.mem_get_info()
        prefill_s = statistics.median(timings["prefill"])
        decode_s = statistics.median(timings["decode"]) if args.gen > 1 else 0.0
        elements = (prompt_tokens + decode_tokens) * config["num_hidden_layers"] * 2 * \
            config["num_key_value_heads"] * config["head_dim"]
        point.update(prefill_s=prefill_s, prefill_tok_s=prompt_tokens / prefill_s, ttft_s=prefill_s,
                     decode_s=decode_s, decode_tok_s=decode_tokens / decode_s if decode_s > 0 else 0.0,
                     peak_mem_bytes=total - free, torch_max_allocated_bytes=torch.cuda.max_memory_allocated(),
                     kv_bytes=state["kv_bytes"], bits_per_element=state["kv_bytes"] * 8 / elements,
                     repetitions=repetitions, window_s=seconds, energy_j_per_token=None, avg_watts=None,
                     prefill_j_per_token=None, decode_j_per_token=None, energy_status=energy.status, status="ok")
        if use_energy and joules is not None:
            j_per_token = joules / (repetitions * (prompt_tokens + decode_tokens))
            kwh = j_per_token * 1e6 * args.pue / 3.6e6
            point.update(energy_j_per_token=j_per_token, avg_watts=joules / seconds, kwh_per_mtok=kwh,
                         gco2_per_mtok=kwh * args.grid_gco2_per_kwh, usd_per_mtok=kwh * args.usd_per_kwh)
            if args.gen > 1:
                p_seconds, p_reps, p_joules = energy_window(lambda: generate(1, False), energy, args.energy_window, 1)
                if p_joules is not None:
                    point["prefill_j_per_token"] = p_joules / p_reps / prompt_tokens
                    point["prefill_avg_watts"] = p_joules / p_seconds
                    point["decode_j_per_token"] = (joules / repetitions - p_joules / p_reps) / decode_tokens
            else:
                point["prefill_j_per_token"] = j_per_token
        elif use_energy:
            point["energy_status"] = energy.status
    except torch.OutOfMemoryError as e:
        point.update(status="oom", oom_reason=str(e).splitlines()[0], energy_status=energy.status)
    finally:
        del ids, mask
        torch.cuda.empty_cache()
    return point


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_json(path, report, results):
    """The report with the results so far, replacing the file whole (written beside it, then renamed)."""
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(dict(report, results=results), f, indent=2)
    os.replace(partial, path)


def write_csv(path, results):
    columns = []
    for row in results:
        columns += [k for k, v in row.items() if not isinstance(v, (dict, list)) and k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in results:
            writer.writerow(["null" if row.get(k, "") is None else row.get(k, "") for k in columns])


def ragged_lengths(path):
    """{(prompt_len, batch): prompt lengths} of the ragged points of a kvq bench JSON file."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"baseline_hf.py: --lengths-from {path}: {e}")
    lengths = {}
    for point in report.get("results", []):
        if point.get("ragged") and point.get("prompt_lengths"):
            lengths[point["prompt_len"], point["batch"]] = point["prompt_lengths"]
    if not lengths:
        sys.exit(f"baseline_hf.py: --lengths-from {path}: no ragged point with prompt_lengths in it")
    return lengths


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dummy", required=True, choices=sorted(PRESETS))
    p.add_argument("--prompt-len", default="512")
    p.add_argument("--batch", default="1")
    p.add_argument("--gen", type=int, default=16)
    p.add_argument("--ragged", action="store_true")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--energy-window", type=float, default=5.0)
    p.add_argument("--grid-gco2-per-kwh", type=float, default=400.0)
    p.add_argument("--usd-per-kwh", type=float, default=0.10)
    p.add_argument("--pue", type=float, default=1.0)
    p.add_argument("--lengths-from", metavar="KVQ_JSON",
                   help="with --ragged: the prompt lengths kvq bench drew for each (prompt_len, batch) point of "
                        "this JSON file, so both sides run the same batches (else drawn here from --seed)")
    p.add_argument("--json")
    p.add_argument("--csv")
    args = p.parse_args()
    if args.gen < 1:
        p.error("--gen must be at least 1")
    if args.lengths_from and not args.ragged:
        p.error("--lengths-from gives ragged batches' lengths: it needs --ragged")
    args.kvq_lengths = ragged_lengths(args.lengths_from) if args.lengths_from else {}

    import torch
    import transformers
    props = torch.cuda.get_device_properties(0)
    bus_id = None
    if hasattr(props, "pci_bus_id"):
        bus_id = f"{getattr(props, 'pci_domain_id', 0):08X}:{props.pci_bus_id:02X}:{getattr(props, 'pci_device_id', 0):02X}.0"
    energy = NvmlEnergy(bus_id)
    model = build_model(args.dummy, args.seed)
    dtype = str(next(model.parameters()).dtype)
    backends = sdpa_backends(model, PRESETS[args.dummy]["vocab_size"])
    settings = dict(prompt_len=[int(x) for x in args.prompt_len.split(",")], batch=[int(x) for x in args.batch.split(",")],
                    gen=args.gen, ragged=args.ragged, lengths_from=args.lengths_from, warmup=args.warmup,
                    repeats=args.repeats, seed=args.seed,
                    energy_window_s=args.energy_window, energy_status=energy.status,
                    grid_gco2_per_kwh=args.grid_gco2_per_kwh, usd_per_kwh=args.usd_per_kwh, pue=args.pue,
                    torch=torch.__version__, transformers=transformers.__version__, dtype=dtype,
                    attn_implementation=model.config._attn_implementation, sdpa_kernels=backends,
                    peak_mem_method="device memory in use (torch.cuda.mem_get_info total - free) after the point, "
                                    "caching allocator emptied before it",
                    ttft="the batched prefill's time: every request gets its first token when it ends")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {props.name}, {dtype}, "
          f"{model.config._attn_implementation} [{', '.join(backends) or 'kernels not identified'}], "
          f"warm-up {args.warmup}, repeats >= {args.repeats}, energy: {energy.status}", flush=True)
    print(f"{'kv':<8} {'prompt':>6} {'batch':>5} {'gen':>4} {'prefill_s':>9} {'prefill t/s':>11} {'decode t/s':>10} "
          f"{'peak GiB':>8} {'J/token':>9} {'W':>5}  status", flush=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    report = dict(command="baseline_hf", argv=sys.argv, kvq_version=None, git_commit=git_commit(),
                  date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), host=platform.node(), device=props.name,
                  model=f"dummy:{args.dummy}", settings=settings)
    results = []
    for length in settings["prompt_len"]:
        for batch in settings["batch"]:
            point = measure_point(model, args.dummy, length, batch, args, energy, generator)
            results.append(point)

            def fmt(key, spec):
                value = point.get(key)
                return format(value, spec) if isinstance(value, (int, float)) else "-"
            peak = point.get("peak_mem_bytes")
            print(f"{KV_NAME:<8} {length:>6} {batch:>5} {args.gen:>4} {fmt('prefill_s', '.3f'):>9} "
                  f"{fmt('prefill_tok_s', '.1f'):>11} {fmt('decode_tok_s', '.1f'):>10} "
                  f"{(format(peak / 2**30, '.2f') if peak else '-'):>8} {fmt('energy_j_per_token', '.4g'):>9} "
                  f"{fmt('avg_watts', '.0f'):>5}  {point['status']}", flush=True)
            if args.json:  # after every point, as kvq bench does: a run stopped part-way keeps what it measured
                write_json(args.json, report, results)
    if args.json:
        write_json(args.json, report, results)
    if args.csv:
        write_csv(args.csv, results)


if __name__ == "__main__":
    main()
