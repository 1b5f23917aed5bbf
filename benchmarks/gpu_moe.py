"""Mixture-of-experts MLP on one GPU: llmc's Triton kernels (kernels_gpu.moe.fused_moe) vs PyTorch's grouped GEMM
(torch.nn.functional.grouped_mm, what transformers 5 runs), same run, same data, bf16.

Layer shapes of Mixtral-8x7B (D 4096, F 14336, 8 experts, top-2) and Qwen3-30B-A3B (D 2048, F 768, 128 experts,
top-8) at T in {1, 8, 64, 512, 4096} tokens. Each case is captured as a CUDA graph (which also proves the path
never syncs with the host) and replayed; the median replay time is reported, with the expert weight bytes read
per second (experts touched x 3 D F x 2 bytes) and TFLOP/s (2 x 3 D F x T x top_k). Outputs are checked against
each other (relative error). Writes JSON to $OUT/gpu_moe.json (or ./bench_results/).
  --sweep  instead times a grid of tile configs per (layer, T) and prints the best (writes gpu_moe_sweep.json)
"""
from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels_gpu.moe import fused_moe, route_topk

LAYERS = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}  # D, F, E, top_k
TOKENS = (1, 8, 64, 512, 4096)


def torch_grouped_moe(x, router, gate_up, down, top_k):
    """The baseline: the same routing, then torch's grouped GEMM over expert-sorted rows."""
    weights, experts = route_topk(x, router, top_k, True)
    flat = experts.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(gate_up.shape[0], dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)
    tokens = order // top_k
    h = F.grouped_mm(x.index_select(0, tokens), gate_up.transpose(-2, -1), offs=offs)  # [P, 2F]
    f = gate_up.shape[1] // 2
    act = F.silu(h[:, :f]) * h[:, f:]
    y = F.grouped_mm(act, down.transpose(-2, -1), offs=offs).float() * weights.reshape(-1)[order, None]
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tokens, y).to(x.dtype)


def replay_ms(fn, reps=30):
    """Median ms of a CUDA-graph replay of fn()."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], out


def sweep():
    """Time tile configs for decode-sized and prefill-sized T on both layers; print the best few of each."""
    grids = {
        "decode": [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
                   for bn, bk, w, st in itertools.product((32, 64, 128), (64, 128, 256), (4,), (3, 4, 5))],
        "prefill": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, num_warps=w, num_stages=st)
                    for bm, bn, w, st in itertools.product((64, 128), (128, 256), (4, 8), (3, 4))],
    }
    cases = {"decode": (1, 8), "prefill": (512, 4096)}
    out = []
    for name, (d, f, e, k) in LAYERS.items():
        gate_up = (torch.randn(e, 2 * f, d, device="cuda") / d ** 0.5).to(torch.bfloat16)
        down = (torch.randn(e, d, f, device="cuda") / f ** 0.5).to(torch.bfloat16)
        router = torch.randn(e, d, device="cuda").to(torch.bfloat16)
        for phase, tokens in cases.items():
            for t in tokens:
                x = torch.randn(t, d, device="cuda").to(torch.bfloat16)
                timed = []
                for tiles in grids[phase]:
                    try:
                        ms, _ = replay_ms(lambda: fused_moe(x, router, gate_up, down, top_k=k, renormalize=True,
                                                            tiles=tiles), reps=10)
                    except Exception as err:  # noqa: BLE001 (out of shared memory, ...)
                        print(f"skip {tiles}: {type(err).__name__}", flush=True)
                        continue
                    timed.append((ms, tiles))
                timed.sort(key=lambda p: p[0])
                for ms, tiles in timed[:3]:
                    print(f"{name} T={t} {phase}: {ms:.3f} ms {tiles}", flush=True)
                out.append({"layer": name, "T": t, "phase": phase, "timed": timed})
    out_dir = Path(os.environ.get("OUT", "bench_results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_moe_sweep.json").write_text(json.dumps(out, indent=1))


def main():
    if "--sweep" in sys.argv:
        return sweep()
    torch.manual_seed(0)
    results = []
    for name, (d, f, e, k) in LAYERS.items():
        gate_up = (torch.randn(e, 2 * f, d, device="cuda") / d ** 0.5).to(torch.bfloat16)
        down = (torch.randn(e, d, f, device="cuda") / f ** 0.5).to(torch.bfloat16)
        router = torch.randn(e, d, device="cuda").to(torch.bfloat16)
        for t in TOKENS:
            x = torch.randn(t, d, device="cuda").to(torch.bfloat16)
            torch.cuda.set_sync_debug_mode("error")  # any host sync in the llmc path raises
            fused_moe(x, router, gate_up, down, top_k=k, renormalize=True)
            torch.cuda.set_sync_debug_mode("default")
            ms_llmc, y_llmc = replay_ms(lambda: fused_moe(x, router, gate_up, down, top_k=k, renormalize=True))
            ms_torch, y_torch = replay_ms(lambda: torch_grouped_moe(x, router, gate_up, down, k))
            _, experts = route_topk(x, router, k, True)
            touched = int(torch.unique(experts).numel())
            rel = float((y_llmc.float() - y_torch.float()).norm() / y_torch.float().norm())
            row = {"layer": name, "T": t, "llmc_ms": ms_llmc, "torch_grouped_mm_ms": ms_torch,
                   "speedup": ms_torch / ms_llmc, "experts_touched": touched,
                   "llmc_TBps": touched * 3 * d * f * 2 / ms_llmc / 1e9,
                   "llmc_TFLOPs": 2 * 3 * d * f * t * k / ms_llmc / 1e9, "rel_err_vs_torch": rel}
            results.append(row)
            print(json.dumps(row), flush=True)
    print(f"{'layer':15s} {'T':>5s} {'llmc ms':>9s} {'torch ms':>9s} {'speedup':>8s} {'TB/s':>6s} {'TFLOP/s':>8s} "
          f"{'relerr':>8s}")
    for r in results:
        print(f"{r['layer']:15s} {r['T']:5d} {r['llmc_ms']:9.3f} {r['torch_grouped_mm_ms']:9.3f} {r['speedup']:8.2f} "
              f"{r['llmc_TBps']:6.2f} {r['llmc_TFLOPs']:8.1f} {r['rel_err_vs_torch']:8.1e}")
    out_dir = Path(os.environ.get("OUT", "bench_results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_moe.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "results": results},
                                                     indent=1))


if __name__ == "__main__":
    main()
