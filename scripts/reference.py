#!/usr/bin/env python3
"""Independent references for kvq's model code: a float64 numpy Llama forward
built on the `gguf` package's dequantization, and llama-cpp-python (llama.cpp as
its users see it) for tokens, logits and greedy continuations.

Neither shares code with kvq, so agreement with both is evidence the engine is
right, not that two copies of one mistake agree. Importable by the tests;

    python scripts/reference.py logits --model M --tokens-json F --out F.npy [--engine numpy|llama_cpp]

writes float32 logits, the rows of each sequence of the JSON list of token lists
concatenated in order (the layout of `kvq-testtool logits`).
"""

import argparse
import functools
import hashlib
import json
import os
import sys

import numpy as np

CACHE_DIR = os.path.expanduser("~/.cache/kvq")
_CONFIG_KEY = "config.json"  # the model config, stored beside the weights in the cache


@functools.lru_cache(maxsize=2)
def _model(model_path):
    """Config and float64 weights of a Llama GGUF. The config and gguf-dequantized
    float32 tensors are cached in ~/.cache/kvq keyed by the file's sha256, so
    repeated runs skip parsing the file and the (slow, pure numpy) dequantization."""
    digest = hashlib.sha256()
    with open(model_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    cache_path = os.path.join(CACHE_DIR, f"reference-weights-{digest.hexdigest()[:32]}.npz")
    if os.path.exists(cache_path):
        with np.load(cache_path) as cached:
            arrays = dict(cached)
    else:
        arrays = _read_gguf(model_path)
        os.makedirs(CACHE_DIR, exist_ok=True)
        # Write then rename so a concurrent or interrupted run never sees half a file.
        partial = f"{cache_path}.{os.getpid()}.partial"
        with open(partial, "wb") as f:
            np.savez(f, **arrays)
        os.replace(partial, cache_path)

    config = json.loads(str(arrays.pop(_CONFIG_KEY)))
    weights = {name: w.astype(np.float64) for name, w in arrays.items()}
    # SmolLM2 ties the output projection to the embedding: no output.weight.
    weights.setdefault("output.weight", weights["token_embd.weight"])
    return config, weights


def _read_gguf(model_path):
    """{tensor name: float32 array as gguf dequantizes it} plus the config as JSON."""
    import gguf  # only building the cache needs it

    reader = gguf.GGUFReader(model_path)

    def field(name):
        return reader.fields[name].contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{model_path}: architecture {arch!r}, the reference implements llama")
    arrays = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    n_heads = field("llama.attention.head_count")
    config = {
        "n_layers": field("llama.block_count"),
        "n_heads": n_heads,
        "n_kv_heads": field("llama.attention.head_count_kv"),
        "head_dim": arrays["blk.0.attn_q.weight"].shape[0] // n_heads,
        "rope_base": field("llama.rope.freq_base"),
        "rms_eps": field("llama.attention.layer_norm_rms_epsilon"),
    }
    arrays[_CONFIG_KEY] = np.array(json.dumps(config))
    return arrays


def _rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rope(x, positions, base):
    """llama.cpp's "norm" RoPE: rotates adjacent pairs (x[2i], x[2i+1]) by
    pos * base^(-2i/head_dim). GGUF stores Q/K rows permuted for this layout.
    x: (n_tokens, n_heads, head_dim); positions: (n_tokens,)"""
    head_dim = x.shape[-1]
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angle = positions[:, None, None].astype(np.float64) * inv_freq  # (n_tokens, 1, head_dim/2)
    cos, sin = np.cos(angle), np.sin(angle)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


class _NumpyState:
    """One sequence's KV cache for the numpy forward: per layer, pre-RoPE keys and
    values of every token so far, (n_tokens, n_kv_heads, head_dim) float64."""

    def __init__(self, n_layers):
        self.keys = [None] * n_layers
        self.values = [None] * n_layers
        self.n_tokens = 0


def _numpy_step(config, weights, state, tokens, kv_fp16):
    """Runs tokens (appended to state) through the model; returns their logits
    (len(tokens), vocab) float64."""
    n_heads, n_kv_heads, head_dim = config["n_heads"], config["n_kv_heads"], config["head_dim"]
    eps = config["rms_eps"]
    n_new = len(tokens)
    positions = np.arange(state.n_tokens, state.n_tokens + n_new)
    x = weights["token_embd.weight"][np.asarray(tokens)]  # (n_new, hidden)

    for layer in range(config["n_layers"]):
        def w(name, layer=layer):
            return weights[f"blk.{layer}.{name}.weight"]

        h = _rms_norm(x, w("attn_norm"), eps)
        q = (h @ w("attn_q").T).reshape(n_new, n_heads, head_dim)
        k = (h @ w("attn_k").T).reshape(n_new, n_kv_heads, head_dim)
        v = (h @ w("attn_v").T).reshape(n_new, n_kv_heads, head_dim)
        if kv_fp16:
            # kvq stores pre-RoPE K and V as fp16 and applies RoPE after reading.
            k = k.astype(np.float16).astype(np.float64)
            v = v.astype(np.float16).astype(np.float64)
        if state.keys[layer] is not None:
            k = np.concatenate([state.keys[layer], k])
            v = np.concatenate([state.values[layer], v])
        state.keys[layer], state.values[layer] = k, v

        n_total = k.shape[0]
        q = _rope(q, positions, config["rope_base"])
        k = _rope(k, np.arange(n_total), config["rope_base"])
        # GQA: query head j reads KV head j // (n_heads / n_kv_heads), as in llama.cpp.
        group = n_heads // n_kv_heads
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim)  # (heads, n_new, n_total)
        causal = positions[:, None] >= np.arange(n_total)[None, :]
        scores = np.where(causal[None], scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(n_new, n_heads * head_dim)
        x = x + attn @ w("attn_output").T

        h = _rms_norm(x, w("ffn_norm"), eps)
        gate = h @ w("ffn_gate").T
        up = h @ w("ffn_up").T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w("ffn_down").T

    state.n_tokens += n_new
    return _rms_norm(x, weights["output_norm.weight"], eps) @ weights["output.weight"].T


def numpy_forward(model_path, token_batches, kv_fp16=True):
    """Logits (n_tokens, vocab) float64 for every position of each token list,
    each sequence run independently from position 0. kv_fp16 rounds pre-RoPE
    keys and values to fp16 as kvq's fp16 KV cache does."""
    config, weights = _model(str(model_path))
    return [_numpy_step(config, weights, _NumpyState(config["n_layers"]), list(tokens), kv_fp16)
            for tokens in token_batches]


def numpy_greedy(model_path, tokens, n, kv_fp16=True):
    """Greedy (argmax) continuation of n tokens with the numpy forward, decoding
    one token per step against its KV cache (its logits equal a full forward's)."""
    config, weights = _model(str(model_path))
    state = _NumpyState(config["n_layers"])
    logits = _numpy_step(config, weights, state, list(tokens), kv_fp16)[-1]
    ids = []
    for i in range(n):
        if i > 0:
            logits = _numpy_step(config, weights, state, [ids[-1]], kv_fp16)[-1]
        ids.append(int(np.argmax(logits)))
    return ids


def _llama(model_path, n_ctx, logits_all=False, vocab_only=False):
    from llama_cpp import Llama  # only the llama.cpp path needs it

    return Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                 logits_all=logits_all, vocab_only=vocab_only, n_threads=2, verbose=False)


def llama_cpp_tokenize(model_path, text, special):
    """Token ids as llama.cpp gives them (no BOS added: this model's metadata
    says add_bos_token = false). special: parse <|im_start|> etc. as tokens."""
    llm = _llama(model_path, n_ctx=64, vocab_only=True)
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)


def llama_cpp_chat_prompt(model_path, user_text):
    """user_text as one user turn in the model's chat template (from its GGUF
    metadata), ending with the assistant's turn opened, rendered the way
    llama-cpp-python renders it."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = _llama(model_path, n_ctx=64, vocab_only=True)

    def token_text(token):
        return llm.detokenize([token], special=True).decode("utf-8")

    formatter = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        bos_token=token_text(llm.token_bos()), eos_token=token_text(llm.token_eos()),
        add_generation_prompt=True)
    return formatter(messages=[{"role": "user", "content": user_text}]).prompt


def llama_cpp_logits(model_path, tokens):
    """llama.cpp's logits (n_tokens, vocab) float32 for every position of tokens."""
    llm = _llama(model_path, n_ctx=max(len(tokens), 64), logits_all=True)
    llm.eval(list(tokens))
    return np.array(llm.scores[:len(tokens)], dtype=np.float32)


def llama_cpp_greedy(model_path, tokens, n):
    """llama.cpp's greedy (argmax) continuation of n tokens."""
    # logits_all: without it llama-cpp-python keeps no logits (its sampler reads them).
    llm = _llama(model_path, n_ctx=len(tokens) + n + 1, logits_all=True)
    llm.eval(list(tokens))
    ids = []
    for _ in range(n):
        ids.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([ids[-1]])
    return ids


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    logits = commands.add_parser("logits", help="logits of every position of a ragged batch")
    logits.add_argument("--model", required=True)
    logits.add_argument("--tokens-json", required=True, help="JSON list of lists of token ids")
    logits.add_argument("--out", required=True, help=".npy, float32 (sum of lengths, vocab)")
    logits.add_argument("--engine", choices=("numpy", "llama_cpp"), default="numpy")
    args = parser.parse_args()

    with open(args.tokens_json) as f:
        batches = json.load(f)
    if args.engine == "numpy":
        rows = numpy_forward(args.model, batches)
    else:
        rows = [llama_cpp_logits(args.model, tokens) for tokens in batches]
    np.save(args.out, np.concatenate(rows).astype(np.float32))
    return 0


if __name__ == "__main__":
    sys.exit(main())
