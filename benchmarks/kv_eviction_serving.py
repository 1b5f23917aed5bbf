"""Serving capacity under KV eviction: how many long sequences run at once in the same KV memory.

The same model, compiled with each KV setting (the full cache, H2O, StreamingLLM), serves the same long requests
(prompts of --prompt-len tokens of tinyshakespeare at different offsets, --new-tokens greedy tokens each,
EOS ignored) through the Engine with one fixed KV budget (--kv-mib of pool, the pool's blocks counted from each
program's bytes per block: the attention-mass pool H2O adds counts against it). Every step records how many
requests run; the table reports the most and the mean running at once, preemptions, the pool's blocks, and
generated tokens per second over the whole run (prefill included; prefix caching off, so every setting
prefills every prompt).

    python benchmarks/kv_eviction_serving.py --target cpu --requests 12 --prompt-len 1536
Prints a table and writes JSON (default bench_results/kv_eviction_serving.json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = ("full", "h2o:0.25", "streaming:4:256")


RANDOM_SMOLLM2 = dict(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                      max_position_embeddings=8192, tie_word_embeddings=True)


def model_source(source):
    """(what compile_model takes, its keyword arguments): a registry name / path, or "random-smollm2": SmolLM2-135M's
    shapes with random weights (capacity and speed do not depend on the weights; no checkpoint to carry)."""
    if source != "random-smollm2":
        return source, {}
    from lowering.models import llama
    from lowering.models.config import ModelConfig

    cfg = ModelConfig(**RANDOM_SMOLLM2)
    return llama.build_model(cfg, seed=0), {"config": cfg}


def run_setting(source, spec, prompts, args) -> dict:
    from lowering import compile_model
    from runtime import Engine, SamplingParams
    from runtime.long_context import parse_setting

    src, kw = model_source(source)
    if args.target != "cpu":
        kw["dtype"] = "bfloat16"
    cm = compile_model(src, target=args.target, progress=False, max_model_len=args.max_model_len,
                       **kw, **parse_setting(spec))
    engine = Engine(cm, max_model_len=args.max_model_len, max_num_seqs=len(prompts),
                    max_num_batched_tokens=args.batch_tokens, enable_prefix_caching=False,
                    program_options={"kv_cache_bytes": args.kv_mib << 20})
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    sched = engine.scheduler
    for i, p in enumerate(prompts):
        sched.add_request(engine._make_request(i, p, params, False))
    running, steps = [], 0
    start = time.perf_counter()
    while sched.has_unfinished_requests():
        engine._step()
        running.append(len(sched.running))
        steps += 1
    seconds = time.perf_counter() - start
    plan = engine.eviction
    return {"setting": spec, "num_blocks": engine.program.num_blocks,
            "kv_bytes_per_block": int(engine.program.kv_cache_bytes() // engine.program.num_blocks),
            "blocks_per_seq_max": plan.max_blocks(engine.block_size) if plan else -(-(args.prompt_len + args.new_tokens) // engine.block_size),
            "max_running": int(max(running)), "mean_running": float(np.mean(running)),
            "preemptions": sched.num_preemptions, "steps": steps, "seconds": seconds,
            "gen_tok_s": len(prompts) * args.new_tokens / seconds, "compactions": engine.num_compactions}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--prompt-len", type=int, default=1536)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--kv-mib", type=int, default=96, help="KV pool bytes, MiB (default 96)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default=str(Path(__import__("os").environ.get("OUT", "bench_results")) /
                                         "kv_eviction_serving.json"))
    args = ap.parse_args()

    if args.source == "random-smollm2":
        ids = np.random.default_rng(0).integers(100, RANDOM_SMOLLM2["vocab_size"], 200_000).tolist()
    else:
        from lowering import compile_model

        tok = compile_model(args.source, progress=False, max_model_len=args.max_model_len).tokenizer
        ids = tok.encode((Path(args.data) / "tinyshakespeare.txt").read_text(encoding="utf-8"))
    stride = max(1, (len(ids) - args.prompt_len) // args.requests)
    prompts = [ids[i * stride: i * stride + args.prompt_len] for i in range(args.requests)]
    rows = []
    print(f"{'setting':<18s} {'blocks':>6s} {'B/block':>8s} {'blk/seq':>7s} {'max run':>7s} {'mean run':>8s} "
          f"{'preempt':>7s} {'gen tok/s':>9s} {'s':>6s}")
    for spec in args.settings.split(","):
        r = run_setting(args.source, spec.strip(), prompts, args)
        rows.append(r)
        print(f"{r['setting']:<18s} {r['num_blocks']:6d} {r['kv_bytes_per_block']:8d} {r['blocks_per_seq_max']:7d} "
              f"{r['max_running']:7d} {r['mean_running']:8.2f} {r['preemptions']:7d} {r['gen_tok_s']:9.2f} "
              f"{r['seconds']:6.0f}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = platform.processor() or platform.machine()
    if args.target == "cuda":
        import torch

        device = torch.cuda.get_device_name(0)
    out = {"date": datetime.date.today().isoformat(), "machine": device,
           "commit": commit, "args": vars(args), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
