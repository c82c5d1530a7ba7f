"""kvq bench on the CPU with the real model: every DESIGN.md bench field in the
JSON and the CSV, for fp16 and a calibrated format; a point whose KV does not
fit the pool is reported "oom" and the sweep goes on; capacity mode finds the
largest batch under --mem-budget by running it and shows the next one does not
fit. Kept small (about 30 s on 2 cores); timings are never checked."""

import csv
import json

from cli_util import assert_error

SHIPPED_CALIBRATION = "calibration/SmolLM2-135M-Instruct.Q4_1.calib.safetensors"
ENVELOPE = {"command", "argv", "kvq_version", "git_commit", "date", "host", "device", "model", "settings", "results"}
BENCH_FIELDS = {"kv", "prompt_len", "batch", "gen", "page", "prefill_s", "prefill_tok_s", "ttft_s", "decode_tok_s",
                "peak_mem_bytes", "kv_bytes", "bits_per_element", "energy_j_per_token", "avg_watts", "energy_status",
                "status"}
# fp16 pages of SmolLM2 (30 layers, 3 KV heads x 64) at 64 tokens: layers x K,V x kv_dim x tokens x 2 bytes.
FP16_PAGE_BYTES = 30 * 2 * 192 * 64 * 2
GIB = 2 ** 30


def bench(kvq, model_path, repo_root, tmp_path, name, *args):
    out_json, out_csv = tmp_path / f"{name}.json", tmp_path / f"{name}.csv"
    proc = kvq("bench", "--device", "cpu", "-m", model_path, "--calib", repo_root / SHIPPED_CALIBRATION,
               "--repeats", 1, "--threads", 2, *args, "--json", out_json, "--csv", out_csv)
    assert proc.returncode == 0, proc.stderr
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return proc, json.loads(out_json.read_text()), rows


def test_sweep_reports_every_design_field_in_json_and_csv(kvq, model_path, repo_root, tmp_path):
    proc, report, rows = bench(kvq, model_path, repo_root, tmp_path, "sweep", "--prompt-len", "32,64",
                               "--batch", "1,2", "--gen", 4, "--kv", "fp16,nuq3-1%")
    assert ENVELOPE <= report.keys() and report["command"] == "bench"
    assert report["settings"]["energy_status"].startswith("unsupported: ")
    assert report["settings"]["decode"].startswith("after the whole batch is prefilled")
    results = report["results"]
    assert [(r["kv"], r["prompt_len"], r["batch"]) for r in results] == [
        (kv, L, B) for kv in ("fp16", "nuq3-1%") for L in (32, 64) for B in (1, 2)]
    for r in results:
        assert BENCH_FIELDS <= r.keys(), BENCH_FIELDS - r.keys()
        assert r["status"] == "ok" and r["gen"] == 4 and r["page"] == 64
        assert r["prompt_tokens"] == r["prompt_len"] * r["batch"]
        assert r["prefill_s"] > 0 and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and 0 < r["ttft_s"]
        assert r["peak_mem_bytes"] > 50 << 20  # the fp32 weights alone are ~0.5 GiB
        # Pages held: prompt + 3 fed-back tokens per sequence, rounded up to 64-token pages.
        pages = r["batch"] * -(-(r["prompt_len"] + 3) // 64)
        if r["kv"] == "fp16":
            assert r["kv_bytes"] == pages * FP16_PAGE_BYTES
        assert r["energy_status"].startswith("unsupported: ") and r["energy_j_per_token"] is None
        assert r["avg_watts"] is None
        # Effective bits: the bytes held (pages and per-sequence state) over the elements stored.
        elements = (r["prompt_tokens"] + r["batch"] * 3) * 30 * 2 * 192
        assert abs(r["bits_per_element"] - r["kv_bytes"] * 8 / elements) < 1e-9 * r["bits_per_element"]
    assert len(rows) == len(results)
    assert BENCH_FIELDS <= set(rows[0].keys())
    for row, r in zip(rows, results):
        assert row["kv"] == r["kv"] and int(row["batch"]) == r["batch"]
        assert float(row["prefill_tok_s"]) == r["prefill_tok_s"] and row["energy_j_per_token"] == "null"
    assert "J/token" in proc.stdout and "kv MiB" in proc.stdout


def test_point_that_does_not_fit_is_oom_and_the_sweep_goes_on(kvq, model_path, repo_root, tmp_path):
    # A pool of two fp16 pages: one 64-token prompt (+3 fed back: 2 pages) fits, four do not.
    pool_gib = 2.5 * FP16_PAGE_BYTES / GIB
    _, report, rows = bench(kvq, model_path, repo_root, tmp_path, "oom", "--prompt-len", 64, "--batch", "4,1",
                            "--gen", 4, "--pool-gib", pool_gib)
    statuses = [(r["batch"], r["status"]) for r in report["results"]]
    assert statuses == [(4, "oom"), (1, "ok")]
    assert "pool holds 2" in report["results"][0]["oom_reason"]
    assert [row["status"] for row in rows] == ["oom", "ok"]


def test_generation_past_the_context_is_refused_per_point(kvq, model_path, repo_root, tmp_path):
    # SmolLM2's context is 8192: 8192 + 2 generated tokens need 8193 positions, 8191 + 2 fit (the last token is
    # never fed back). The refused point says why; the sweep goes on (nothing is run for it).
    _, report, _ = bench(kvq, model_path, repo_root, tmp_path, "context", "--prompt-len", "8192", "--gen", 2)
    (point,) = report["results"]
    assert point["status"] == "prompt length 8192 + 2 generated tokens exceeds the model's context of 8192"
    _, report, _ = bench(kvq, model_path, repo_root, tmp_path, "capacity-context", "--prompt-len", "8192", "--gen", 2,
                         "--mem-budget", 1)
    assert [r["status"] for r in report["results"]] == [point["status"]]


def test_capacity_mode_runs_the_largest_batch_and_the_next_is_oom(kvq, model_path, repo_root, tmp_path):
    # 3.5 fp16 pages: three 32-token sequences (+3 fed back: one page each) fit, a fourth does not.
    budget_bytes = 3.5 * FP16_PAGE_BYTES
    proc, report, rows = bench(kvq, model_path, repo_root, tmp_path, "capacity", "--prompt-len", 32, "--gen", 4,
                               "--kv", "fp16,nuq3-1%", "--mem-budget", budget_bytes / GIB)
    results = report["results"]
    assert report["settings"]["pool"] == "--mem-budget"
    for kv in ("fp16", "nuq3-1%"):
        ok = [r for r in results if r["kv"] == kv and r["status"] == "ok"]
        oom = [r for r in results if r["kv"] == kv and r["status"] == "oom"]
        assert len(ok) == 1 and len(oom) == 1, results
        max_batch = ok[0]["max_batch"]
        assert ok[0]["batch"] == max_batch >= 1 and oom[0]["batch"] == max_batch + 1 and oom[0]["max_batch"] == max_batch
        assert BENCH_FIELDS <= ok[0].keys()
        assert ok[0]["kv_bytes_needed"] <= budget_bytes < oom[0]["kv_bytes_needed"]
        assert {"batch": max_batch, "fits": True} in ok[0]["capacity_probes"]
        assert {"batch": max_batch + 1, "fits": False} in ok[0]["capacity_probes"]
    assert [r for r in results if r["kv"] == "fp16" and r["status"] == "ok"][0]["max_batch"] == 3
    assert "max_batch 3" in proc.stdout
    assert len(rows) == 4 and "max_batch" in rows[0]


def test_dummy_weights_need_the_gpu(kvq):
    assert_error(kvq("bench", "--device", "cpu", "--dummy", "llama2-7b"), 1, "--dummy")


def test_ragged_lengths_are_recorded_for_the_hf_baseline(kvq, model_path, repo_root, tmp_path):
    """--ragged draws lengths in [L/4, L]; the JSON lists them, and baseline_hf.py --lengths-from reads them back
    per (prompt_len, batch) point, so HF runs the very same batches."""
    import baseline_hf
    _, report, _ = bench(kvq, model_path, repo_root, tmp_path, "ragged", "--prompt-len", "64", "--batch", "3",
                         "--gen", 2, "--ragged")
    (point,) = report["results"]
    lengths = point["prompt_lengths"]
    assert len(lengths) == 3 and all(16 <= n <= 64 for n in lengths) and sum(lengths) == point["prompt_tokens"]
    assert baseline_hf.ragged_lengths(tmp_path / "ragged.json") == {(64, 3): lengths}
