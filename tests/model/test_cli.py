"""The kvq command line as a user meets it: errors are one `kvq: error:` line
with exit status 1 (usage: 2) for bad flags, bad model files, prompts longer
than the context and an exhausted pool; --batch-file answers every request in
order, each equal to running it alone; ppl's windowing agrees with a perplexity
computed here from llama.cpp's logits; --json carries DESIGN.md's envelope."""

import json
import math

import numpy as np
import pytest

import gguf
from cli_util import assert_error

DESIGN_ENVELOPE = {"command", "argv", "kvq_version", "git_commit", "date", "host", "device", "model",
                   "settings", "results"}


def test_usage_errors_exit_2(kvq, model_path):
    assert_error(kvq(), 2)
    assert_error(kvq("run", "--bogus"), 2, "--bogus")
    assert_error(kvq("run", "-m", model_path), 2, "exactly one of")
    assert_error(kvq("run", "-m", model_path, "-p", "hi", "--kv", "nuq9"), 2, "nuq9")
    assert_error(kvq("ppl", "-m", model_path), 2, "--file")
    assert_error(kvq("run", "-m", model_path, "-p", "hi", "--temp", "-1"), 2)


def test_bad_model_files(kvq, tmp_path, model_path):
    assert_error(kvq("info", "-m", tmp_path / "absent.gguf"), 1, "cannot open")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    assert_error(kvq("info", "-m", junk), 1, "not a GGUF file")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(model_path.read_bytes()[:4 << 20])
    assert_error(kvq("info", "-m", truncated), 1, "past the end of the file")


def write_tiny_gguf(path, arch="llama", tokenizer="gpt2", embd_type=None):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(["a", "b", "ab", "c"])
    w.add_token_types([1, 1, 1, 1])
    w.add_token_merges(["a b"])
    if embd_type is None:
        w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    else:
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[embd_type]
        raw = np.zeros((4, 32 * 8 // block_elems * block_bytes), np.uint8)
        w.add_tensor("token_embd.weight", raw, raw_dtype=embd_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_architecture_tokenizer_and_tensor_type(kvq, tmp_path):
    path = tmp_path / "other_arch.gguf"
    write_tiny_gguf(path, arch="gptneox")
    assert_error(kvq("info", "-m", path), 1, "unsupported architecture 'gptneox'")
    path = tmp_path / "spm.gguf"
    write_tiny_gguf(path, tokenizer="llama")
    assert_error(kvq("info", "-m", path), 1, "'llama'")
    path = tmp_path / "missing.gguf"
    write_tiny_gguf(path)
    assert_error(kvq("run", "-m", path, "-p", "ab"), 1, "missing tensor 'output_norm.weight'")


def test_info_lists_tensor_types(kvq, model_path, tmp_path):
    out = tmp_path / "info.json"
    proc = kvq("info", "-m", model_path, "--json", out, check=0)
    assert "Q4_1 x210" in proc.stdout and "Q8_0 x1" in proc.stdout and "F32 x61" in proc.stdout
    report = json.loads(out.read_text())
    assert DESIGN_ENVELOPE <= report.keys()
    assert report["results"][0]["n_kv_heads"] == 3


def test_prompt_longer_than_context_is_refused(kvq, model_path, tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text(" a" * 9000)  # " a" is one token each: 9000 > 8192
    assert_error(kvq("run", "-m", model_path, "-f", prompt, "-n", "1"), 1, "longer than the model's context of 8192")


def test_request_larger_than_the_pool_is_refused(kvq, model_path):
    # 0.002 GiB holds one 64-token page of 1.4 MiB.
    proc = kvq("run", "-m", model_path, "-p", "Once upon a time", "-n", "100", "--pool-gib", "0.002")
    assert_error(proc, 1, "pool holds only 1")


def test_batch_file_answers_in_order_like_single_runs(kvq, model_path, tmp_path):
    prompts = ["The capital of France is", "Emma Woodhouse, handsome, clever, and rich,",
               "1, 2, 3, 4,"]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps({"prompt": p, "n": 6 + 2 * k}) + "\n" for k, p in enumerate(prompts)))
    out = tmp_path / "batch.json"
    # A 2-page pool with 16-token pages admits one or two requests at a time: the rest wait their turn.
    kvq("run", "-m", model_path, "--batch-file", batch, "--page", "16", "--pool-gib", "0.0022", "--json", out,
        check=0)
    results = json.loads(out.read_text())["results"]
    assert [r["request"] for r in results] == [1, 2, 3]
    for k, prompt in enumerate(prompts):
        single = tmp_path / f"single{k}.json"
        kvq("run", "-m", model_path, "-p", prompt, "-n", 6 + 2 * k, "--json", single, check=0)
        alone = json.loads(single.read_text())["results"][0]
        assert results[k]["prompt_tokens"] == alone["prompt_tokens"]
        assert results[k]["tokens"] == alone["tokens"], prompt


def test_bad_batch_file_names_the_line(kvq, model_path, tmp_path):
    batch = tmp_path / "bad.jsonl"
    batch.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    assert_error(kvq("run", "-m", model_path, "--batch-file", batch), 1, "line 2")


def test_ppl_windows_match_llama_cpp(kvq, model_path, repo_root, tmp_path):
    """kvq ppl on a short text vs the same sliding windows scored here from
    llama.cpp's logits. llama.cpp quantizes activations to 8 bits for its Q4_1
    matmuls, which moves per-token NLL by ~1e-2; over ~500 tokens the mean
    agrees within 1% of PPL, while an off-by-one in windowing or scoring moves it
    by far more (scoring a token with no context, or twice)."""
    reference = pytest.importorskip("reference")
    text = (repo_root / "data" / "evaluation.txt")
    if not text.is_file():
        pytest.skip("data/evaluation.txt missing (run scripts/setup.sh)")
    sample = tmp_path / "sample.txt"
    sample.write_text(text.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    out = tmp_path / "ppl.json"
    kvq("ppl", "-m", model_path, "-f", sample, "--ctx", "256", "--stride", "96", "--max-tokens", "500",
        "--json", out, check=0)
    report = json.loads(out.read_text())
    assert DESIGN_ENVELOPE <= report.keys()
    result = report["results"][0]
    for key in ("kv", "ctx", "stride", "tokens", "ppl", "ppl_stderr", "bits_per_element", "outliers_over_capacity"):
        assert key in result
    tokens = reference.llama_cpp_tokenize(model_path, sample.read_text(encoding="utf-8"), False)[:500]
    nll, scored_until = [], 1
    for begin in range(0, len(tokens), 96):
        window = tokens[begin:begin + 256]
        logits = reference.llama_cpp_logits(model_path, window).astype(np.float64)
        for r in range(len(window) - 1):
            target = begin + r + 1
            if target >= scored_until:
                row = logits[r]
                nll.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[tokens[target]])
        scored_until = begin + len(window)
        if scored_until >= len(tokens):
            break
    assert result["tokens"] == len(nll) == len(tokens) - 1
    expected = math.exp(np.mean(nll))
    assert abs(result["ppl"] - expected) / expected < 0.01, (result["ppl"], expected)
    assert result["bits_per_element"] == 16.0
