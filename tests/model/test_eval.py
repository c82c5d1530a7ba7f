"""kvq eval on the CPU at small lengths: the JSON carries DESIGN.md's fields for
every point, every format answers the same prompts (equal digests), --chat is
recorded and changes the prompts, KL rows compare each format with fp16, and
lengths beyond the model's context, unknown tasks and a KL run without a
format to compare are refused."""

import json

import pytest

from cli_util import assert_error

GENERATION_KEYS = {"task", "length", "depth", "kv", "samples", "accuracy", "ci95", "chat", "seed",
                   "prompts_digest", "scores"}
KL_KEYS = {"task", "length", "kv", "samples", "kl_mean", "kl_p99", "top1_agree", "chat"}


@pytest.fixture(scope="module")
def eval_data(repo_root):
    haystack, words = repo_root / "data" / "haystack.txt", repo_root / "data" / "words.txt"
    for path in (haystack, words):
        if not path.is_file():
            pytest.skip(f"{path} not found (run scripts/setup.sh)")
    return ["--haystack", haystack, "--words", words]


def run_eval(kvq, model_path, tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    kvq("eval", "--device", "cpu", "-m", model_path, "--json", out, *args, check=0)
    return json.loads(out.read_text())


def test_passkey_and_ruler_paired_across_formats(kvq, model_path, tmp_path, eval_data):
    report = run_eval(kvq, model_path, tmp_path, "eval", "--task", "passkey,niah_single_1", "--lengths", "256",
                      "--samples", "2", "--kv", "fp16,nuq3-1%", "--depths", "2", *eval_data)
    assert report["command"] == "eval"
    assert report["settings"]["chat"] is False and report["settings"]["seed"] == 42
    results = report["results"]
    for r in results:
        assert GENERATION_KEYS <= r.keys(), r
        assert 0 <= r["accuracy"] <= 100 and r["ci95"] >= 0 and r["chat"] is False and r["length"] == 256
    aggregates = [r for r in results if r["depth"] is None]
    assert {(r["task"], r["kv"]) for r in aggregates} == {
        (t, kv) for t in ("passkey", "niah_single_1") for kv in ("fp16", "nuq3-1%")}
    for r in aggregates:
        assert r["samples"] == 2 and len(r["scores"]) == 2
        assert r["accuracy"] == pytest.approx(100 * sum(r["scores"]) / 2)
    # Paired: the same prompts for both formats, other prompts for another task.
    digests = {(r["task"], r["kv"]): r["prompts_digest"] for r in aggregates}
    assert digests[("passkey", "fp16")] == digests[("passkey", "nuq3-1%")]
    assert digests[("niah_single_1", "fp16")] == digests[("niah_single_1", "nuq3-1%")]
    assert digests[("passkey", "fp16")] != digests[("niah_single_1", "fp16")]
    # Passkey rows per depth (2 depths: 0% and 100%, one prompt each) besides the aggregate.
    depths = sorted(r["depth"] for r in results if r["task"] == "passkey" and r["kv"] == "fp16" and r["depth"] is not None)
    assert depths == [0.0, 100.0]
    # The 135M model finds a passkey in 256 tokens with fp16 keys and values.
    passkey_fp16 = next(r for r in aggregates if r["task"] == "passkey" and r["kv"] == "fp16")
    assert passkey_fp16["accuracy"] == 100


def test_chat_is_recorded_and_changes_prompts(kvq, model_path, tmp_path):
    plain = run_eval(kvq, model_path, tmp_path, "plain", "--task", "passkey", "--lengths", "256", "--samples", "1")
    chat = run_eval(kvq, model_path, tmp_path, "chat", "--task", "passkey", "--lengths", "256", "--samples", "1",
                    "--chat")
    assert chat["settings"]["chat"] is True and all(r["chat"] is True for r in chat["results"])
    assert chat["results"][0]["prompts_digest"] != plain["results"][0]["prompts_digest"]


def test_kl_against_fp16(kvq, model_path, tmp_path, repo_root):
    text = repo_root / "data" / "evaluation.txt"
    if not text.is_file():
        pytest.skip(f"{text} not found (run scripts/setup.sh)")
    report = run_eval(kvq, model_path, tmp_path, "kl", "--task", "kl", "--lengths", "128", "--samples", "2",
                      "--kv", "fp16,nuq3-1%,q8_0", "--text", text)
    rows = {r["kv"]: r for r in report["results"]}
    assert set(rows) == {"nuq3-1%", "q8_0"}  # fp16 is the reference
    for r in rows.values():
        assert KL_KEYS <= r.keys() and r["task"] == "kl" and r["tokens"] == 256 and r["samples"] == 2
        assert r["kl_p99"] >= 0 and r["kl_mean"] >= 0 and 0 <= r["top1_agree"] <= 100
    # 8-bit blocks stay closer to fp16 than 3-bit codes.
    assert 0 < rows["q8_0"]["kl_mean"] < rows["nuq3-1%"]["kl_mean"]
    assert rows["q8_0"]["top1_agree"] >= rows["nuq3-1%"]["top1_agree"]


def test_refusals(kvq, model_path):
    assert_error(kvq("eval", "--device", "cpu", "-m", model_path, "--task", "passkey", "--lengths", "16384"), 1,
                 "16384", "context of 8192")
    assert_error(kvq("eval", "--device", "cpu", "-m", model_path, "--task", "passkey,bogus"), 2,
                 "unknown task 'bogus'")
    assert_error(kvq("eval", "--device", "cpu", "-m", model_path, "--task", "passkey", "--lengths", "4Q"), 2, "4Q")
    assert_error(kvq("eval", "--device", "cpu", "-m", model_path, "--task", "kl", "--lengths", "128"), 1,
                 "add a format other than fp16")
    assert_error(kvq("eval", "-m", model_path, "--lengths", "256"), 2, "--task")
