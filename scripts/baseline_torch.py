#!/usr/bin/env python3
"""Baselines for kvq-gpu-bench, measured on the same card in the same device call
(scripts/gpu_check.sh): device-to-device copy, torch SDPA prefill and decode
attention on the kernel benchmark's shapes, and HF transformers fp16 prefill
(sdpa, random weights, logits_to_keep=1) on the --dummy presets' configs.
Prints one line per point and writes JSON (--json)."""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from baseline_hf import build_model  # the presets' HF models, shared with the bench baseline

SHAPES = [("hd64 9/3", 64, 9, 3), ("hd128 32/32", 128, 32, 32), ("hd128 32/8", 128, 32, 8)]


def median_ms(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def kernel_names(fn):
    """Names of the CUDA kernels one call launches (which SDPA backend ran)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = sorted({e.key for e in prof.key_averages() if e.device_time_total > 0},
                   key=lambda k: -sum(e.device_time_total for e in prof.key_averages() if e.key == k))
    return names[:2]


def copy_gbs():
    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(1)
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a), 3, 15)
    return 2 * n / (ms * 1e-3) / 1e9


def sdpa_prefill(lengths, tokens):
    out = []
    for name, d, h, hkv in SHAPES:
        for s in lengths:
            b = max(1, tokens // s)
            q = torch.randn(b, h, s, d, device="cuda", dtype=torch.float16)
            k = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.float16)
            v = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.float16)
            fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=(h != hkv))
            ms = median_ms(fn, 3, 10)
            tflops = b * 4 * s * s * h * d / 2 / (ms * 1e-3) / 1e12
            kernels = kernel_names(fn)
            out.append(dict(shape=name, head_dim=d, n_heads=h, n_kv_heads=hkv, seq_len=s, batch=b, ms=ms,
                            tflops=tflops, kernels=kernels))
            print(f"sdpa-prefill {name:12s} S={s:<6d} B={b:<3d} {ms:8.3f} ms {tflops:7.1f} TFLOP/s  [{kernels[0][:60]}]",
                  flush=True)
            del q, k, v
    return out


def sdpa_decode(copy):
    points = [("smollm2-135m", SHAPES[0], 64, 8192), ("smollm2-135m", SHAPES[0], 1, 8192),
              ("llama3-8b", SHAPES[2], 16, 8192), ("llama2-7b", SHAPES[1], 1, 32768)]
    out = []
    for model, (name, d, h, hkv), b, ctx in points:
        q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.float16)
        k = torch.randn(b, hkv, ctx, d, device="cuda", dtype=torch.float16)
        v = torch.randn(b, hkv, ctx, d, device="cuda", dtype=torch.float16)
        fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=(h != hkv))
        ms = median_ms(fn, 5, 30)
        gbs = b * ctx * hkv * d * 2 * 2 / (ms * 1e-3) / 1e9
        kernels = kernel_names(fn)
        out.append(dict(model=model, shape=name, batch=b, context=ctx, ms=ms, gb_s=gbs, fraction_of_copy=gbs / copy,
                        kernels=kernels))
        print(f"sdpa-decode {model:12s} {name:12s} B={b:<3d} ctx={ctx:<6d} {ms:8.4f} ms {gbs:7.0f} GB/s "
              f"({100 * gbs / copy:.0f}% of copy) [{kernels[0][:50]}]", flush=True)
        del q, k, v
    return out


def hf_prefill(preset, points):
    model = build_model(preset)
    config = model.config
    dtype = next(model.parameters()).dtype
    out = []
    gen = torch.Generator(device="cpu").manual_seed(5)
    for L, B in points:
        for ragged in (False, True):
            ids = torch.randint(0, config.vocab_size, (B, L), device="cuda")
            mask = None
            tokens = B * L
            if ragged:  # lengths uniform in [L/4, L], left-padded to L as HF batches are
                lengths = torch.randint(L // 4, L + 1, (B,), generator=gen)
                mask = torch.zeros(B, L, dtype=torch.long, device="cuda")
                for i, n in enumerate(lengths.tolist()):
                    mask[i, L - n:] = 1
                tokens = int(lengths.sum())

            def fn():
                with torch.inference_mode():
                    model(input_ids=ids, attention_mask=mask, logits_to_keep=1)

            ms = median_ms(fn, 2, 5)
            out.append(dict(model=preset, prompt_len=L, batch=B, ragged=ragged, tokens=tokens, prefill_s=ms / 1e3,
                            prefill_tok_s=tokens / (ms / 1e3), dtype=str(dtype),
                            attn_implementation=model.config._attn_implementation))
            print(f"hf-prefill {preset:13s} L={L:<5d} B={B:<3d} {'ragged' if ragged else 'full':7s} {ms:8.2f} ms "
                  f"{tokens / (ms / 1e3):9.0f} tok/s  ({dtype}, {model.config._attn_implementation})", flush=True)
    del model
    torch.cuda.empty_cache()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--parts", default="copy,prefill,decode,hf")
    p.add_argument("--lengths", default="512,2048,8192,16384")
    p.add_argument("--tokens", type=int, default=16384)
    a = p.parse_args()
    import transformers
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                  date=time.strftime("%Y-%m-%d"))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {result['device']}", flush=True)
    result["copy_gb_s"] = copy_gbs()
    print(f"torch copy {result['copy_gb_s']:.0f} GB/s (read + write)", flush=True)
    if "prefill" in a.parts:
        result["sdpa_prefill"] = sdpa_prefill([int(x) for x in a.lengths.split(",")], a.tokens)
    if "decode" in a.parts:
        result["sdpa_decode"] = sdpa_decode(result["copy_gb_s"])
    if "hf" in a.parts:
        result["hf_prefill"] = hf_prefill("smollm2-135m", [(2048, 64)]) + \
            hf_prefill("llama2-7b", [(2048, 1), (2048, 4), (2048, 16), (8192, 4)])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
