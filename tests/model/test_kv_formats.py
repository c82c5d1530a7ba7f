"""KV formats and calibration through the command line: every --kv format runs
a short perplexity inside a band around fp16 that its bit width allows (bands
are ~3x the changes measured at ctx 256 on these 512 tokens, so a broken
quantizer — wrong normalization, lost outliers, a codebook misread — fails
them); calibration is deterministic, Fisher weighting changes the codebooks,
and a calibration that does not fit the model or the format is refused."""

import json
import os
import struct

import numpy as np
import pytest

from cli_util import assert_error

SHIPPED_CALIBRATION = "calibration/SmolLM2-135M-Instruct.Q4_1.calib.safetensors"

# Format: (largest PPL change vs fp16, bits per element range at ctx 256 with one sink, --no-tail).
FORMATS = {  # measured 2026-11-27 (CPU): +0.3, +1.3, +3.8, +1.2, +3.1, +18.8, +0.4, +17, +11, +6.4, +355, +31, +7.1 %
    "q8_0": (0.01, (8.4, 8.6)),
    "fp8": (0.04, (8.2, 8.3)),
    "int4": (0.10, (4.0, 4.4)),
    "nuq4": (0.05, (4.0, 4.4)),
    "nuq4-1%": (0.08, (4.4, 4.8)),
    "q4_0": (0.45, (4.4, 4.6)),
    "kivi4": (0.02, (4.5, 13.5)),  # its 128 fp16 tokens are half of a 256-token window
    "int3": (0.45, (3.0, 3.4)),
    "nuq3": (0.30, (3.0, 3.4)),
    "nuq3-1%": (0.18, (3.4, 3.8)),
    "int2": (8.0, (2.0, 2.4)),
    "nuq2-1%": (0.80, (2.4, 2.8)),
    "kivi2": (0.20, (2.5, 11.5)),
}


@pytest.fixture(scope="session")
def eval_text(repo_root):
    path = repo_root / "data" / "evaluation.txt"
    if not path.is_file():
        pytest.skip("data/evaluation.txt missing (run scripts/setup.sh)")
    return path


@pytest.fixture(scope="session")
def shipped_calibration(repo_root):
    return repo_root / SHIPPED_CALIBRATION


def read_safetensors(path):
    """(metadata, {name: float32 array}) from a safetensors file of F32 tensors."""
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    metadata = header.pop("__metadata__", {})
    start = 8 + header_len
    tensors = {name: np.frombuffer(data[start + t["data_offsets"][0]:start + t["data_offsets"][1]], dtype="<f4")
               for name, t in header.items()}
    return metadata, tensors


def test_every_format_within_its_band(kvq, model_path, eval_text, shipped_calibration, tmp_path):
    out = tmp_path / "ppl.json"
    kvq("ppl", "-m", model_path, "-f", eval_text, "--ctx", 256, "--max-tokens", 512, "--calib", shipped_calibration,
        "--kv", ",".join(["fp16", *FORMATS]), "--no-tail", "--json", out, check=0)
    results = {r["kv"]: r for r in json.loads(out.read_text())["results"]}
    fp16 = results["fp16"]
    assert fp16["bits_per_element"] == 16
    for name, (max_change, (bits_lo, bits_hi)) in FORMATS.items():
        r = results[name]
        change = r["ppl"] / fp16["ppl"] - 1
        assert r["tokens"] == fp16["tokens"]
        assert 1e-5 < abs(change) <= max_change, f"{name}: ppl {r['ppl']:.4f} vs fp16 {fp16['ppl']:.4f}"
        assert bits_lo <= r["bits_per_element"] <= bits_hi, f"{name}: {r['bits_per_element']} bits"
        assert isinstance(r["outliers_over_capacity"], int)
    # Ordering the bit widths must respect.
    assert results["nuq4-1%"]["ppl"] < results["nuq3-1%"]["ppl"] < results["nuq2-1%"]["ppl"]
    # The default --tail reads each query's own page exactly from a 64-row fp16 window per
    # sequence: 64 * 16 bits over 256 tokens add exactly 4 bits per element.
    tail = tmp_path / "tail.json"
    kvq("ppl", "-m", model_path, "-f", eval_text, "--ctx", 256, "--max-tokens", 512, "--calib", shipped_calibration,
        "--kv", "nuq3-1%", "--json", tail, check=0)
    with_tail = json.loads(tail.read_text())["results"][0]
    assert with_tail["bits_per_element"] == pytest.approx(results["nuq3-1%"]["bits_per_element"] + 4.0)
    assert with_tail["ppl"] < results["nuq3-1%"]["ppl"]


def test_options_that_read_everything_exactly_give_fp16(kvq, model_path, eval_text, shipped_calibration, tmp_path):
    """One window in one chunk with --exact-chunk, or sinks over the whole window: every read is exact."""
    def ppl(*extra):
        out = tmp_path / "p.json"
        kvq("ppl", "-m", model_path, "-f", eval_text, "--ctx", 128, "--max-tokens", 127, "--calib",
            shipped_calibration, "--json", out, *extra, check=0)
        return json.loads(out.read_text())["results"][0]["ppl"]
    reference = ppl("--kv", "fp16")
    assert ppl("--kv", "nuq2-1%", "--exact-chunk") == pytest.approx(reference, rel=1e-4)
    assert ppl("--kv", "int3", "--sinks", 128) == pytest.approx(reference, rel=1e-4)
    assert ppl("--kv", "int3") != pytest.approx(reference, rel=1e-3)


def test_calibration_is_deterministic_and_fisher_changes_codebooks(kvq, model_path, repo_root, eval_text, tmp_path):
    text = repo_root / "data" / "calibration.txt"
    common = ("calibrate", "-m", model_path, "-f", text, "--samples", 1, "--ctx", 192, "--bits", "2,3",
              "--outliers", "0,0.01", "--seed", 5)
    a, b, plain = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "plain.safetensors"
    kvq(*common, "-o", a, check=0)
    kvq(*common, "-o", b, check=0)
    kvq(*common, "--sensitivity", "none", "-o", plain, check=0)
    assert a.read_bytes() == b.read_bytes()
    meta, fisher = read_safetensors(a)
    plain_meta, uniform = read_safetensors(plain)
    assert meta["sensitivity"] == "fisher" and plain_meta["sensitivity"] == "none"
    assert set(fisher) == set(uniform)
    assert len([n for n in fisher if ".codebook." in n]) == 30 * 2 * 2 * 2  # layers x K/V x bits x outliers
    codebook_gap = max(np.abs(fisher[n] - uniform[n]).max() for n in fisher if ".codebook." in n)
    assert codebook_gap > 1e-2, "Fisher weights left the codebooks unchanged"
    for name in fisher:
        if ".codebook." in name:
            assert np.all(np.diff(fisher[name]) > 0) and -1 <= fisher[name][0] and fisher[name][-1] <= 1, name
    # The ranges do not depend on the weights.
    assert all(np.array_equal(fisher[n], uniform[n]) for n in fisher if ".k.lo." in n or ".k.hi." in n)
    # Usable for what it holds, refused for what it lacks.
    kvq("ppl", "-m", model_path, "-f", eval_text, "--ctx", 64, "--max-tokens", 63, "--calib", a, "--kv", "nuq3-1%",
        check=0)
    assert_error(kvq("ppl", "-m", model_path, "-f", eval_text, "--ctx", 64, "--calib", a, "--kv", "nuq4-1%"), 1,
                 "blk.0.k.codebook.4.1%", "--bits 4")
    assert_error(kvq("ppl", "-m", model_path, "-f", eval_text, "--ctx", 64, "--calib", a, "--kv", "int3-2%"), 1,
                 "blk.0.k.lo.2%")


def test_calibration_for_another_model_is_refused(kvq, model_path, eval_text, shipped_calibration, tmp_path):
    data = shipped_calibration.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    header["__metadata__"]["model_fingerprint"] = "0" * 16
    header["__metadata__"]["model"] = "other.gguf"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    other = tmp_path / "other.safetensors"
    other.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + header_len:])
    assert_error(kvq("ppl", "-m", model_path, "-f", eval_text, "--calib", other, "--kv", "nuq3-1%"), 1,
                 "another model", "other.gguf")
    assert_error(kvq("ppl", "-m", model_path, "-f", eval_text, "--calib", tmp_path / "none.safetensors",
                     "--kv", "int4"), 1, "cannot open")
    assert_error(kvq("ppl", "-m", model_path, "-f", eval_text, "--kv", "int4-3%"), 2, "int4-3%", "valid formats")


@pytest.mark.skipif(os.environ.get("KVQ_SLOW_TESTS") != "1", reason="minutes of CPU: set KVQ_SLOW_TESTS=1")
def test_shipped_calibration_regenerates(kvq, model_path, repo_root, shipped_calibration, tmp_path):
    """The shipped file is what its recorded command writes (same machine kind and threads)."""
    meta, _ = read_safetensors(shipped_calibration)
    out = tmp_path / "again.safetensors"
    kvq("calibrate", "-m", model_path, "-f", repo_root / "data" / meta["text"], "--samples", meta["samples"],
        "--ctx", meta["ctx"], "--bits", meta["bits"], "--outliers", meta["outliers"],
        "--sensitivity", meta["sensitivity"], "--seed", meta["seed"], "--threads", meta["threads"], "-o", out, check=0)
    assert out.read_bytes() == shipped_calibration.read_bytes()
