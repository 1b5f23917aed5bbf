"""Tensor parallelism on several GPUs: decode speed and KV capacity of TP=1, 2 (and 4), same machine, same run.

Model: Llama-3-8B-shaped (32 layers, hidden 4096, MLP 14336, 32 / 8 heads, d=128, vocab 128256, untied) with
random bf16 weights made piece by piece on each rank's GPU (cuda_tp.RandomParams: only the speed is measured).
The graph is traced from the abstract model, run through llmc's pass pipeline and, for TP > 1,
shard_tensor_parallel; rank 0 runs in this process, the other ranks in spawned workers (NCCL).

Measured per TP degree, batch size and mode: the decode step as the engine drives it, at a context of `--context`
tokens; tokens/s = batch / step time. sync: host StepInput -> Program.step_greedy, which broadcasts the step to the
workers, replays the CUDA graph with the all-reduces inside, and returns the tokens. async (the engine's default):
step_async launches step t+1, its token rows fed on the GPUs with step t's picks, before step t's tokens are read.
Speedup = tokens/s over TP=1's in the same mode and run. `--profile` adds rank 0's kernel times per step. KV capacity: blocks in each replica's pool at the same
gpu_memory_fraction (a rank holds 1 / tp of each block's KV heads, so the same memory holds tp times the blocks,
plus what the smaller weight share frees).

`--check` first runs the correctness check on the GPUs: a small random-weight Llama (float32, and bfloat16),
the same prompts through the Engine at TP=1, 2 (and 4), greedy tokens compared.

    PYTHONPATH=. python3 benchmarks/gpu_tensor_parallel.py [--tp 1 2 4] [--batch 1 64] [--check]

Prints a table, writes JSON to $OUT/gpu_tensor_parallel.json (else bench_results/).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # tracing only: JAX must not take GPU memory

import numpy as np  # noqa: E402

LLAMA3_8B = dict(architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                 num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                 max_position_embeddings=8192, tie_word_embeddings=False)


def step_graph(cfg_kwargs: dict, tp: int, dtype: str = "bfloat16", block_size: int = 16):
    """The step graph of a model shape (traced from the abstract Flax model: no weights are made)."""
    import jax.numpy as jnp
    from flax import nnx

    from lowering import frontend
    from lowering.models import llama, nnx_params
    from lowering.models.config import ModelConfig
    from lowering.params import DERIVED_KEY
    from lowering.passes.shard_tensor_parallel import shard_tensor_parallel
    from lowering.pipeline import CompileOptions, run_pipeline

    cfg = ModelConfig(**cfg_kwargs)
    cls = llama.model_class(cfg)
    abstract = nnx.eval_shape(lambda: cls(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))
    graph, _ = frontend.trace(*nnx_params.forward_fn(abstract))
    graph, _ = run_pipeline(graph, CompileOptions(target="cuda", dtype=dtype, block_size=block_size))
    graph.meta.pop(DERIVED_KEY, None)
    return shard_tensor_parallel(graph, tp) if tp > 1 else graph


def decode_input(program, batch: int, context: int):
    from runtime.step import StepInput

    width = -(-(context + 1) // program.block_size)
    tables = (np.arange(batch * width, dtype=np.int32).reshape(batch, width) + 1) % program.num_blocks
    return StepInput(token_ids=np.full(batch, 7, np.int32), positions=np.full(batch, context, np.int32),
                     slot_mapping=(tables[:, -1] * program.block_size + context % program.block_size).astype(np.int32),
                     query_start=np.arange(batch + 1, dtype=np.int32), seq_lens=np.full(batch, context + 1, np.int32),
                     block_tables=tables, logit_rows=np.arange(batch, dtype=np.int32))


def run_async(program, inp, steps: int) -> None:
    """`steps` decode steps as the engine's async scheduling runs them: step t+1 launched (its token rows fed on the
    GPUs with step t's picks) before step t's tokens are read."""
    rows = np.arange(inp.num_seqs, dtype=np.int32)
    last = program.step_async(inp)
    for _ in range(steps - 1):
        pending = program.step_async(inp, feed_rows=rows, feed_from=rows)
        last.result()
        last = pending
    last.result()


def time_decode(program, batch: int, context: int, steps: int, repeats: int, mode: str = "sync") -> float:
    """Median ms of one decode step as the engine drives it.

    sync: host StepInput -> step_greedy -> tokens on the host, one step at a time.
    async: the engine's async scheduling: step t+1 is launched (step_async, its token rows fed on the GPUs with step
    t's picks) before step t's tokens are read back, so the host's work overlaps the GPUs'."""
    inp = decode_input(program, batch, context)
    for _ in range(5):  # graph capture, warm-up
        program.step_greedy(inp)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        if mode == "sync":
            for _ in range(steps):
                program.step_greedy(inp)
        else:
            run_async(program, inp, steps)
        times.append((time.perf_counter() - t) / steps * 1e3)
    return statistics.median(times)


def profile_decode(program, batch: int, context: int, steps: int = 20, top: int = 16) -> list[dict]:
    """Device time per kernel name over `steps` async decode steps on rank 0 (torch profiler, CUPTI sees the kernels
    inside the CUDA graphs): where a step's time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    inp = decode_input(program, batch, context)
    program.step_greedy(inp)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_async(program, inp, steps)
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name[:90], [0.0, 0])
            k[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            k[1] += 1
    rows_out = [{"kernel": n, "us_per_step": t / steps, "calls_per_step": c / steps} for n, (t, c) in kernels.items()]
    rows_out.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows_out)
    print(f"  profile, batch {batch}: {total:.0f} us of kernels a step", flush=True)
    for r in rows_out[:top]:
        print(f"  {r['us_per_step']:8.1f} us {r['calls_per_step']:6.1f}x  {r['kernel']}", flush=True)
    return rows_out


def build(graph, tp: int, fraction: float, max_num_seqs: int, max_model_len: int, all_reduce: str = "auto"):
    from lowering.backends import build_program
    from lowering.backends.cuda_tp import RandomParams

    source = RandomParams(seed=0)
    kw = dict(max_num_seqs=max_num_seqs, max_model_len=max_model_len, gpu_memory_fraction=fraction)
    if tp > 1:
        kw["tp_all_reduce"] = "auto" if all_reduce == "fold" else all_reduce
        kw["fold_all_reduces"] = all_reduce == "fold"
    if tp == 1:
        import torch

        from lowering.backends.cuda import CudaProgram

        return CudaProgram(graph, source.for_rank(graph, 0, torch.device("cuda", 0)), **kw)
    return build_program("cuda", graph, source, **kw)


def check_tokens(tps, out: dict, dtypes=("float32", "bfloat16")) -> None:
    """Greedy tokens of a small random Llama through the Engine at each TP degree, float32 and bfloat16."""
    from lowering import compile_model
    from lowering.models import llama
    from lowering.models.config import ModelConfig
    from runtime import Engine, SamplingParams

    cfg = ModelConfig(**{**LLAMA3_8B, "vocab_size": 32003, "hidden_size": 512, "intermediate_size": 1408,
                         "num_layers": 4, "num_heads": 8, "num_kv_heads": 4, "head_dim": 64})
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (5, 37, 130, 1, 300, 17)]
    for dtype in dtypes:
        model = llama.random_model(cfg, seed=3)
        tokens = {}
        for tp in tps:
            t0 = time.perf_counter()
            print(f"check {dtype} TP={tp}: starting", flush=True)
            cm = compile_model(model, target="cuda", dtype=dtype, tensor_parallel=tp, progress=False)
            engine = Engine(cm, num_blocks=1024, max_num_seqs=4, max_num_batched_tokens=256, max_model_len=512)
            print(f"check {dtype} TP={tp}: engine ready after {time.perf_counter() - t0:.0f} s", flush=True)
            outs = engine.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
            tokens[tp] = [o.token_ids for o in outs]
            blocks = engine.program.num_blocks
            if hasattr(engine.program, "close"):
                engine.program.close()
            del engine, cm
            gc.collect()
            same = sum(a == b for a, b in zip(tokens[tp], tokens[tps[0]]))
            agree = np.mean([np.mean(np.array(a) == np.array(b)) for a, b in zip(tokens[tp], tokens[tps[0]])])
            out.setdefault("check", []).append({"dtype": dtype, "tp": tp, "same_sequences": int(same),
                                                "sequences": len(prompts), "token_agreement": float(agree),
                                                "num_blocks": blocks})
            print(f"check {dtype} TP={tp}: {same}/{len(prompts)} sequences identical to TP={tps[0]} "
                  f"(token agreement {agree:.4f}), {blocks} KV blocks, {time.perf_counter() - t0:.0f} s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (smoke runs)")
    ap.add_argument("--fraction", type=float, default=0.85, help="gpu_memory_fraction of every rank")
    ap.add_argument("--check", action="store_true", help="then compare greedy tokens across TP degrees")
    ap.add_argument("--check-dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--check-only", action="store_true", help="only the token check, no timing")
    ap.add_argument("--all-reduce", nargs="+", default=["auto", "symm"],
                    help="all-reduce implementations to time for TP > 1 (auto: push kernels up to 512 KiB, then "
                         "torch's one-shot, then NCCL; fold: auto with batch-1 all-reduces folded into the fused "
                         "GEMVs; push; symm: torch symmetric memory's one-shot; nccl)")
    ap.add_argument("--modes", nargs="+", default=["async", "sync"], choices=["async", "sync"],
                    help="async: step t+1 launched before step t's tokens are back (the engine's default); sync")
    ap.add_argument("--profile", action="store_true", help="also print rank 0's kernel times per step")
    args = ap.parse_args()

    import torch

    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0),
               "gpus": torch.cuda.device_count(), "torch": torch.__version__, "model": "llama3-8b-shaped bf16",
               "context": args.context, "runs": []}
    cfg = dict(LLAMA3_8B)
    if args.layers:
        cfg["num_layers"] = args.layers
    base: dict[int, float] = {}
    configs = [(tp, ar) for tp in args.tp for ar in (args.all_reduce if tp > 1 else ["-"])]
    if args.check_only:
        configs, args.check = [], True
    for tp, ar in configs:
        t0 = time.perf_counter()
        graph = step_graph(cfg, tp)
        try:
            program = build(graph, tp, args.fraction, max(args.batch), 4096, ar)
        except Exception as e:  # noqa: BLE001 - record and go on with the other configurations
            print(f"TP={tp} ({ar}): failed to start: {type(e).__name__}: {e}", flush=True)
            results["runs"].append({"tp": tp, "all_reduce": ar, "error": f"{type(e).__name__}: {e}"})
            continue
        start_s = time.perf_counter() - t0
        weights = sum(int(np.prod(graph.types[p].shape)) * 2 for p in graph.params)
        for batch in args.batch:
            for mode in args.modes:
                ms = time_decode(program, batch, args.context, args.steps, args.repeats, mode)
                tps_rate = batch / ms * 1e3
                if tp == args.tp[0]:
                    base[(batch, mode)] = tps_rate
                row = {"tp": tp, "all_reduce": ar, "mode": mode, "batch": batch, "step_ms": ms,
                       "tokens_per_s": tps_rate,
                       "speedup": tps_rate / base[(batch, mode)] if (batch, mode) in base else None,
                       "num_blocks": program.num_blocks, "kv_tokens": program.num_blocks * program.block_size,
                       "kv_bytes_per_gpu": program.kv_cache_bytes(), "weight_bytes_per_gpu": weights,
                       "start_s": start_s}
                results["runs"].append(row)
                print(f"TP={tp} ({ar}, {mode}) batch {batch}: {ms:.3f} ms/step, {tps_rate:.0f} tok/s, "
                      f"x{row['speedup'] or 0:.2f}, {program.num_blocks} blocks", flush=True)
            if args.profile:
                results.setdefault("profiles", []).append(
                    {"tp": tp, "all_reduce": ar, "batch": batch,
                     "kernels": profile_decode(program, batch, args.context)[:40]})
        if hasattr(program, "close"):
            program.close()
        del program
        gc.collect()
        torch.cuda.empty_cache()

    if args.check:
        check_tokens(sorted(set([1] + args.tp)), results, tuple(args.check_dtypes))
    out_dir = Path(os.environ.get("OUT") or "bench_results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_tensor_parallel.json").write_text(json.dumps(results, indent=2))
    print(f"\nLlama-3-8B-shaped, bf16, context {args.context}, {results['device']} x{results['gpus']} "
          f"({results['date']})")
    print(f"{'TP':>3} {'all-reduce':>10} {'mode':>5} {'batch':>5} {'ms/step':>9} {'tok/s':>9} {'speedup':>8} "
          f"{'KV blocks':>10} {'KV tokens':>10} {'weights/GPU':>12}")
    for r in results["runs"]:
        if "error" in r:
            print(f"{r['tp']:>3} {r['all_reduce']:>10} failed: {r['error'][:80]}")
            continue
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(f"{r['tp']:>3} {r['all_reduce']:>10} {r['mode']:>5} {r['batch']:>5} {r['step_ms']:>9.3f} "
              f"{r['tokens_per_s']:>9.0f} {sp:>8} {r['num_blocks']:>10} {r['kv_tokens']:>10} "
              f"{r['weight_bytes_per_gpu'] / 1e9:>10.2f}GB")


if __name__ == "__main__":
    main()
