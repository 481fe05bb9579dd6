#!/usr/bin/env python3
"""yoco against the official YOCO code on this machine, in one sitting.

Runs the official implementation (tests/fixtures/official/harness/speed.py: one prefill call with
the cross-decoder skipped, then decode steps) and yoco's `profile --single` for each context and
mixer, alternating which goes first, REPS times, and prints the medians and the paired median of
the ratios (pairing keeps a ratio meaningful when the machine's speed drifts). Standard library
only; the official side needs a Python with torch and YOCO_REF_SRC pointing at the official
`YOCO/` directory (see tests/fixtures/official/README.md).

    cargo build --release --example profile
    YOCO_REF_SRC=/path/to/unilm/YOCO python3 tools/vs_official.py --python /path/to/venv/bin/python

Writes `runs.jsonl` (every run) and `official.jsonl` (the official medians, the format of
`profile --official`) into --out.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def official(py, ctx, sw, steps):
    r = subprocess.run([py, "tests/fixtures/official/harness/speed.py", str(ctx), str(steps), sw],
                       capture_output=True, text=True, cwd=ROOT, check=True)
    v = last_json(r.stdout)
    return {"prefill_s": v["prefill_s"], "decode_tok_s": v["decode_tok_s"], "rss_mb": v.get("peak_rss_mb")}


def yoco(profile, ctx, sw, steps):
    model = "yoco" if sw == "none" else "yoco-swa"
    r = subprocess.run([profile, "--single", model, "--context", str(ctx), "--decode-steps", str(steps)],
                       capture_output=True, text=True, cwd=ROOT, check=True)
    v = last_json(r.stdout)
    return {"prefill_s": v["prefill_s"], "decode_tok_s": v["decode_tokens_per_s"], "rss_mb": v["peak_rss_bytes"] / 1e6}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", required=True, help="a Python interpreter with torch, for the official code")
    ap.add_argument("--profile", default=os.path.join(ROOT, "target/release/examples/profile"))
    ap.add_argument("--contexts", default="1024,2048,4096,16384")
    ap.add_argument("--windows", default="none,1024", help="none (gated retention) and/or sliding windows")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=24, help="decode steps after the prompt")
    ap.add_argument("--out", default=os.path.join(ROOT, "target/vs-official"))
    a = ap.parse_args()
    if "YOCO_REF_SRC" not in os.environ:
        sys.exit("set YOCO_REF_SRC to the official YOCO/ directory (see tests/fixtures/official/README.md)")
    os.makedirs(a.out, exist_ok=True)
    runs = open(os.path.join(a.out, "runs.jsonl"), "w")
    official_lines = []
    start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print("| mixer | context | official prefill | yoco prefill | prefill ratio (official / yoco time) "
          "| official decode | yoco decode | decode ratio | official peak RSS | yoco peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ctx in (int(c) for c in a.contexts.split(",")):
        for sw in a.windows.split(","):
            o, y = [], []
            for i in range(a.reps):
                order = [(o, lambda: official(a.python, ctx, sw, a.steps)), (y, lambda: yoco(a.profile, ctx, sw, a.steps))]
                for sink, run in (order if i % 2 == 0 else order[::-1]):
                    v = run()
                    sink.append(v)
                    runs.write(json.dumps({"impl": "official" if sink is o else "yoco", "ctx": ctx, "sw": sw, **v}) + "\n")
                    runs.flush()
            med = lambda xs, k: statistics.median(x[k] for x in xs)
            prefill = statistics.median(p["prefill_s"] / q["prefill_s"] for p, q in zip(o, y))
            decode = statistics.median(q["decode_tok_s"] / p["decode_tok_s"] for p, q in zip(o, y))
            mixer = "gated retention" if sw == "none" else f"sliding window {sw}"
            rss = lambda xs: "" if any(x["rss_mb"] is None for x in xs) else f"{med(xs, 'rss_mb'):,.0f} MB"
            print(f"| {mixer} | {ctx} | {med(o, 'prefill_s'):.3f} s | {med(y, 'prefill_s'):.3f} s | {prefill:.2f}x "
                  f"| {med(o, 'decode_tok_s'):.1f} tok/s | {med(y, 'decode_tok_s'):.1f} tok/s | {decode:.2f}x "
                  f"| {rss(o)} | {rss(y)} |", flush=True)
            official_lines.append({"ctx": ctx, "sw": None if sw == "none" else int(sw),
                                   "prefill_s": med(o, "prefill_s"), "decode_tok_s": med(o, "decode_tok_s")})
    with open(os.path.join(a.out, "official.jsonl"), "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in official_lines)
    print(f"\n{a.reps} alternating runs per point, {start} to {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


if __name__ == "__main__":
    main()
