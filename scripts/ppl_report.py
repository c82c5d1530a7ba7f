#!/usr/bin/env python3
"""Markdown table of `kvq ppl --json` results in a folder: one row per run,
PPL ± stderr, change vs the fp16 run in %, effective bits, outlier overflow."""

import json
import sys
from pathlib import Path

PEERS = {"fp8", "q8_0", "q4_0", "kivi2", "kivi4"}


def main(folder):
    rows = []
    for path in sorted(Path(folder).glob("*.json")):
        report = json.loads(path.read_text())
        s = report["settings"]
        for r in report["results"]:
            options = [o for o, on in (("--tail", s.get("tail")), ("--exact-chunk", s.get("exact_chunk")),
                                       ("--kscale page", s.get("kscale") == "page"),
                                       (f"--chunk {s.get('chunk')}", s.get("chunk", 2048) != 2048),
                                       (f"--sinks {s.get('sinks')}", s.get("sinks", 1) != 1)) if on]
            if r["kv"] in PEERS or r["kv"] == "fp16":
                options = [o for o in options if o != "--tail"]  # --tail applies to int/nuq only
            if "sensitivity-none" in path.stem:
                options.append("--sensitivity none")
            rows.append((r["kv"], " ".join(options), r, report))
    fp16 = next((r for kv, opts, r, _ in rows if kv == "fp16" and not opts), None)
    if not rows:
        sys.exit(f"no results in {folder}")
    first = rows[0][3]
    print(f"kvq ppl, {first['settings']['file']}, first {first['settings']['max_tokens']} tokens, "
          f"ctx {first['settings']['ctx']}; {first['device']}; {first['date']}; commit {first['git_commit']}\n")
    print("| kv | options | PPL ± stderr | vs fp16 | bits/elem | outliers over capacity |")
    print("| --- | --- | --- | --- | --- | --- |")
    order = {kv: i for i, kv in enumerate(["fp16", "q8_0", "fp8", "int4", "nuq4", "nuq4-1%", "q4_0", "kivi4", "int3",
                                            "nuq3", "nuq3-1%", "int2", "nuq2-1%", "kivi2"])}
    for kv, opts, r, _ in sorted(rows, key=lambda x: (order.get(x[0], 99), x[1])):
        change = f"{(r['ppl'] / fp16['ppl'] - 1) * 100:+.2f}%" if fp16 else "n/a"
        print(f"| {kv} | {opts} | {r['ppl']:.3f} ± {r['ppl_stderr']:.3f} | {change} | {r['bits_per_element']:.2f} | "
              f"{r['outliers_over_capacity']} of {r['outliers_stored'] + r['outliers_over_capacity']} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
