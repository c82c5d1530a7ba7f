"""scripts/report.py on made-up results in the schemas of kvq bench, baseline_hf.py
and kvq ppl: every figure is drawn, the generated section of the document is
replaced in place (text around it kept, a second run changes nothing), newer
measurements replace older ones (but one without energy does not replace one
with energy), out-of-memory points are listed, where a quantized format's
J/token falls less than its throughput rises (or rises less than its
throughput falls) the report says why (its average power changed), the Pareto
front compares perplexities of one window size, cells measured under
superseded conditions are marked, A/B timing runs (--energy-window 0) are
sources but no table's points, and a model measured on two cards gets figures
per card."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

H100 = "NVIDIA H100 80GB HBM3"


def envelope(command, model, results, device=H100, date="2026-11-27T03:00:00Z", **settings):
    argv = ["scripts/baseline_hf.py" if command == "baseline_hf" else "kvq", command, "--made-up"]
    return dict(command=command, argv=argv, kvq_version="0.1.0", git_commit="abc1234", date=date, host="test",
                device=device, model=model, settings=dict(dict(page=64, tail=True, kscale="calib"), **settings),
                results=results)


def bench_point(kv, length, batch, tok_s, watts, status="ok", **extra):
    point = dict(kv=kv, prompt_len=length, batch=batch, gen=8, page=64, ragged=False, prompt_tokens=length * batch,
                 energy_status="ok", status=status)
    if status == "ok":
        tokens = length * batch + batch * 7
        point.update(prefill_s=length * batch / tok_s, prefill_tok_s=tok_s, ttft_s=0.01, decode_s=0.1,
                     decode_tok_s=tok_s / 100, peak_mem_bytes=(1 + batch) << 30, kv_bytes=batch << 26,
                     bits_per_element=16.0 if kv.startswith(("fp16", "hf")) else 3.6,
                     energy_j_per_token=watts / tok_s, avg_watts=watts, prefill_j_per_token=watts / tok_s / 2,
                     decode_j_per_token=watts / tok_s * 10, repetitions=10, window_s=10 * tokens / tok_s)
    point.update(extra)
    return point


def write_results(folder):
    folder.mkdir()
    grid = [(L, B) for L in (2048, 8192) for B in (1, 4)]
    ours = [bench_point("fp16", L, B, 1000.0 * B, 500) for L, B in grid]
    ours += [bench_point("nuq3-1%", L, B, 1500.0 * B, 600) for L, B in grid]  # 1.5x faster, 1.2x the power
    ours.append(bench_point("fp16", 32768, 16, 0, 0, status="oom", oom_reason="the batch needs 8192 KV pages"))
    stale = [bench_point("fp16", 2048, 1, 1.0, 500)]  # measured earlier: replaced by `ours`
    quick = [bench_point("fp16", 2048, 1, 2.0, 500, energy_status="unsupported: --energy-window 0")]  # later, no energy
    hf = [bench_point("hf-fp16", L, B, 800.0 * B, 450) for L, B in grid]
    capacity = [bench_point("fp16", 2048, 7, 5000.0, 600, max_batch=7, mem_budget_gib=8),
                bench_point("fp16", 2048, 8, 0, 0, status="oom", max_batch=7, mem_budget_gib=8),
                bench_point("nuq3-1%", 2048, 30, 9000.0, 650, max_batch=30, mem_budget_gib=8)]
    ablation = [bench_point("nuq3-1%", 8192, 4, 6000.0 - page, 600, page=page) for page in (16, 256)]
    ppl = [dict(kv=kv, ctx=2048, stride=1024, tokens=32767, ppl=value, ppl_stderr=0.3, bits_per_element=bits)
           for kv, value, bits in (("fp16", 22.17, 16), ("nuq3-1%", 22.56, 4.1), ("nuq4-1%", 22.24, 5.1))]
    files = {
        "ours.json": envelope("bench", "dummy:llama2-7b", ours, decode="after the whole batch is prefilled"),
        "old/ours.json": envelope("bench", "dummy:llama2-7b", stale, date="2026-11-20T00:00:00Z"),
        "quick/ours.json": envelope("bench", "dummy:llama2-7b", quick, date="2026-11-28T00:00:00Z"),
        "hf.json": envelope("baseline_hf", "dummy:llama2-7b", hf),
        "capacity.json": envelope("bench", "dummy:llama2-7b", capacity),
        "pages.json": envelope("bench", "models/SmolLM2-135M-Instruct.Q4_1.gguf", ablation),
        "speed.json": envelope("bench", "dummy:smollm2-135m",
                               [bench_point(kv, 2048, 4, s, w) for kv, s, w in (("fp16", 9e4, 300), ("nuq3-1%", 1e5, 300),
                                                                                ("nuq4-1%", 9.5e4, 300),
                                                                                ("q4_0", 4.5e4, 200))],
                               date="2026-11-28T00:00:00Z"),
        "ppl.json": envelope("ppl", "models/SmolLM2-135M-Instruct.Q4_1.gguf", ppl, device="Intel(R) Xeon(R)"),
        "ppl_pages.json": envelope("ppl", "models/SmolLM2-135M-Instruct.Q4_1.gguf",
                                   [dict(ppl[1], ppl=22.5)], device="Intel(R) Xeon(R)", page=16),
        # Another window: the Pareto front must not take its fp16 as the 2048 windows' baseline.
        "ppl_8k.json": envelope("ppl", "models/SmolLM2-135M-Instruct.Q4_1.gguf",
                                [dict(ppl[0], ctx=8192, tokens=16383, ppl=20.48)]),
    }
    # The same model on a second card: its figures beside the first card's, not over them.
    files["h200.json"] = envelope("bench", "dummy:llama2-7b", [bench_point("fp16", 2048, 1, 1100.0, 600)],
                                  device="NVIDIA H200")
    # An A/B timing run (--energy-window 0) at a shape of its own: listed among the sources, in no table.
    timing = envelope("bench", "dummy:llama2-7b", [bench_point("fp16", 8160, 64, 7777.0, 0, energy_status="unsupported")],
                      date="2026-11-28T00:00:00Z")
    timing["argv"] += ["--energy-window", "0"]
    files["ab/timing.json"] = timing
    files["capacity.json"]["argv"] += ["--energy-window", "0"]  # a capacity search: its table keeps it
    for name, report in files.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(json.dumps(report))


def run_report(repo_root, tmp_path):
    return subprocess.run([sys.executable, repo_root / "scripts" / "report.py", "--results", tmp_path / "results",
                           "--figures", tmp_path / "figures", "--doc", tmp_path / "RESULTS.md"],
                          capture_output=True, text=True, timeout=300)


def test_report_draws_every_figure_and_regenerates_its_section(repo_root, tmp_path):
    write_results(tmp_path / "results")
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results\n\nhand-written text\n\n<!-- report:begin (old) -->\nold numbers\n<!-- report:end -->\n\n"
                   "## after\n")
    proc = run_report(repo_root, tmp_path)
    assert proc.returncode == 0, proc.stderr
    figures = {p.name for p in (tmp_path / "figures").iterdir()}
    for kind in ("throughput", "memory", "speedup", "energy"):
        assert f"{kind}_llama2-7b.png" in figures
    assert {"throughput_llama2-7b_h200.png", "memory_llama2-7b_h200.png"} <= figures
    assert {"ablations.png", "pareto_smollm2-135m.png"} <= figures
    text = doc.read_text()
    assert text.startswith("# Results\n\nhand-written text\n") and text.rstrip().endswith("## after")
    assert "old numbers" not in text and text.count("<!-- report:begin") == 1 and text.count("<!-- report:end -->") == 1
    assert "**oom**" in text
    # 1.5x the throughput at 1.2x the power: J/token falls to 0.8, not to 1/1.5, and the report says why.
    assert "throughput x1.50 over fp16, J/token x0.80 (600 W vs 500 W); energy falls less than throughput rises" in text
    # The newer fp16 2048x1 (1000 tok/s, 1.25x HF's 800), not the older one nor a later one without energy.
    assert "| fp16 | 2048 | 1 |  | 1000 | 1.25 |" in text
    # Runs whose decode tokens rode along with prefill chunks (no settings.decode) are marked; phased ones not.
    assert "| 0.01 | 900* |" in text and "| 0.01 | 40 |" in text and "rode along with later prompts' prefill" in text
    assert "| llama2-7b | NVIDIA H100 80GB HBM3 | nuq3-1% | 2048 | 8 | 30 | 4.29 |" in text  # capacity vs fp16's 7
    # --dummy runs of formats with outliers before the synthetic calibration took their quantile are marked; later
    # ones, fp16 and real-model runs not.
    assert "| nuq3-1% | 2048 | 1 |  | 1500\u2020 |" in text and "| nuq3-1% | 2048 | 4 |  | 100000 |" in text
    assert "| fp16 | 2048 | 4 |  | 4000 |" in text and "had unit key ranges" in text
    # Half the throughput at 2/3 of the power: J/token rises to 1.33, not to 2, and the report says why.
    assert "q4_0: throughput x0.50 over fp16, J/token x1.33 (200 W vs 300 W); J/token rises less than throughput falls" in text
    # The timing run's file is a source marked (A/B); its point is in no table.
    assert " (A/B) | `results/ab/timing.json` |" in text and "| fp16 | 8160 | 64 |" not in text and "7777" not in text
    assert "#### Pareto front: smollm2-135m" in text
    assert "| nuq3-1% | +1.76 |" in text  # against fp16 of the same 2048-token windows (22.56 / 22.17)
    assert run_report(repo_root, tmp_path).returncode == 0
    assert doc.read_text() == text  # a second run from the same files changes nothing
