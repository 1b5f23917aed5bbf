"""Cascade-as-speculation vs sending the request to the large model directly, same run (runtime/router.py).

Two models that share a tokenizer: by default SmolLM2-135M-Instruct with the GGUF file's own 4/8-bit blocks
(`weights="gguf"`, the CPU's native kernel: the cheap tier) as the small model and the same checkpoint in
float32 (the expensive tier) as the large one. For each MT-Bench prompt (chat template, greedy, batch of one,
prefix caching off) four ways of answering are timed, alternating, medians of `--repeats`:
  large        the large model alone (the peer: what a request sent straight to it costs);
  small        the small model alone (a cascade whose answer is kept);
  cascade+spec the small model, then the large model checking the small answer as a draft in one pass
               (a cascade that escalates, with cascade-as-speculation);
  cascade      the small model, then the large model from scratch (a cascade that escalates without it).
Every escalated answer is checked token for token against the large model's own. `--small-weights int8`
(etc.) makes a small model that disagrees more often (partial acceptance). Prints a table, writes JSON
(default bench_results/router_cascade.json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mt_bench_questions.jsonl"


def load_prompts(count: int) -> list[str]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return [r["turns"][0] for r in rows[:count]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--small-weights", default="gguf", help="the small tier's weights= (default: gguf)")
    ap.add_argument("--large-weights", default=None, help="the large tier's weights= (default: float32)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="bench_results/router_cascade.json")
    args = ap.parse_args()

    from lowering import compile_model
    from runtime import Engine, SamplingParams
    from runtime.router import CascadePolicy, ModelCost, Router

    def build(weights):
        cm = compile_model(args.source, target="cpu", weights=weights, max_ppl_increase=None, verbose=False,
                           progress=False)
        return Engine(cm, max_model_len=1024, max_num_seqs=4, max_num_batched_tokens=1024, enable_prefix_caching=False)

    small, large = build(args.small_weights), build(args.large_weights)
    engines = {"small": small, "large": large}
    flat = {n: ModelCost(1.0, 1.0) for n in engines}  # the routers' cost accounting is not what is timed here
    keep = Router(engines, CascadePolicy("small", "large", threshold=-np.inf), default="large", costs=flat)
    spec = Router(engines, CascadePolicy("small", "large", threshold=np.inf), default="large", costs=flat)
    scratch = Router(engines, CascadePolicy("small", "large", threshold=np.inf, speculate=False), default="large",
                     costs=flat)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    prompts = load_prompts(args.prompts)

    ways = {
        "large": lambda p: large.generate([p], params, chat=True)[0],
        "small": lambda p: keep.generate([p], params, chat=True)[0].output,
        "cascade+spec": lambda p: spec.generate([p], params, chat=True)[0],
        "cascade": lambda p: scratch.generate([p], params, chat=True)[0].output,
    }
    for way in ways.values():  # warm-up: every step shape compiles once (XLA:CPU), not timed
        for p in prompts:
            way(p)
    rows = []
    for i, p in enumerate(prompts):
        times = {w: [] for w in ways}
        outs = {}
        for _ in range(args.repeats):
            for w, fn in ways.items():
                start = time.perf_counter()
                outs[w] = fn(p)
                times[w].append(time.perf_counter() - start)
        routed = outs["cascade+spec"]
        want = outs["large"].token_ids
        rows.append({
            "prompt": i, "small_tokens": len(outs["small"].token_ids), "large_tokens": len(want),
            "draft_tokens": routed.route.num_draft_tokens, "accepted": routed.route.num_accepted_draft_tokens,
            "same_as_large": routed.output.token_ids == want and outs["cascade"].token_ids == want,
            "small_agrees": outs["small"].token_ids == want,
            **{f"{w}_s": float(np.median(t)) for w, t in times.items()},
        })
        print(f"prompt {i}: " + ", ".join(f"{w} {rows[-1][f'{w}_s']:.2f}s" for w in ways)
              + f", accepted {rows[-1]['accepted']}/{rows[-1]['draft_tokens']}", flush=True)

    def total(way, subset=None):
        return sum(r[f"{way}_s"] for r in rows if subset is None or subset(r))

    def line(name, subset=None):
        n = sum(1 for r in rows if subset is None or subset(r))
        if n == 0:
            return None
        t_large = total("large", subset)
        return {"requests": name, "n": n, "large_s": t_large, "small_s": total("small", subset),
                "cascade_spec_s": total("cascade+spec", subset), "cascade_s": total("cascade", subset),
                "spec_vs_large": total("cascade+spec", subset) / t_large,
                "spec_vs_cascade": total("cascade+spec", subset) / total("cascade", subset),
                "accepted": sum(r["accepted"] for r in rows if subset is None or subset(r)),
                "drafted": sum(r["draft_tokens"] for r in rows if subset is None or subset(r))}

    summary = [s for s in (line("all"), line("small answer accepted whole", lambda r: r["small_agrees"]),
                           line("small answer partly rejected", lambda r: not r["small_agrees"])) if s]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"date": datetime.date.today().isoformat(), "commit": commit, "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "source": args.source, "small_weights": args.small_weights,
              "large_weights": args.large_weights or "float32", "max_tokens": args.max_tokens,
              "repeats": args.repeats, "rows": rows, "summary": summary,
              "all_escalations_exact": all(r["same_as_large"] for r in rows)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"\nsmall = {args.source} weights={args.small_weights}, large = weights={args.large_weights or 'float32'};"
          f" {len(prompts)} MT-Bench prompts, greedy, {args.max_tokens} tokens max, batch 1, medians of "
          f"{args.repeats}; escalations token-identical to the large model: {result['all_escalations_exact']}")
    print("| requests | n | large alone s | small alone s | cascade+spec s | cascade (scratch) s | "
          "cascade+spec / large | cascade+spec / cascade | draft accepted |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in summary:
        print(f"| {s['requests']} | {s['n']} | {s['large_s']:.2f} | {s['small_s']:.2f} | {s['cascade_spec_s']:.2f} | "
              f"{s['cascade_s']:.2f} | {s['spec_vs_large']:.2f}x | {s['spec_vs_cascade']:.2f}x | "
              f"{s['accepted']}/{s['drafted']} |")


if __name__ == "__main__":
    main()
