"""Decode GEMVs with the producer fused in (kernels_gpu.fused_gemv) vs what they replace, on one GPU, same run.

For each projection of a Llama-3.2-1B-shaped (and a Llama-3-8B-shaped, whole or one rank's share at tensor_parallel=2,
and a SmolLM2-135M-shaped) layer at M = 1, 2, 4 activation rows (--ms; M > 1 as --multi-row runs them):
  unfused  the CUDA backend's path before the fusion: the producer kernel (add_rms_norm / silu_and_mul, or nothing)
           then cuBLAS bf16 (F.linear); for the logits also the f32 cast
  cuBLAS   F.linear alone (the GEMV's peer: what the weight read costs cuBLAS)
  fused    one fused_gemv launch
Each case is a CUDA graph of calls rotating between copies of the weight (together past the 50 MB L2), median of
25 replays, per call (benchmarks/gpu_linear.py's method). Every fused output is checked against its float64 reference
in the same run. Rates are TB/s of weight bytes.

  --sweep   first times a grid of tiles (BLOCK_N, BLOCK_K, warps, stages) per prologue and M, and shows the best per
            (M, shape) beside the default (the JSON keeps the whole grid)

Prints a table last; writes JSON to $OUT/gpu_fused_gemv.json (or ./bench_results/).
    PYTHONPATH=. python3 benchmarks/gpu_fused_gemv.py [--sweep] [--models 1b 8b 8b-tp2 smollm2] [--ms 1 5 16]
        [--multi-row dot|row_split|rows]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gpu_linear import bench_graph, n_copies, rel_err
from kernels_gpu import fused_gemv as fg
from kernels_gpu.activations import silu_and_mul
from kernels_gpu.norms import add_rms_norm

MODELS = {  # name: {projection: (N, K, prologue)}
    "1b": {"qkv": (3072, 2048, "add_norm"), "o_proj": (2048, 2048, "none"), "gate_up": (16384, 2048, "add_norm"),
           "down": (2048, 8192, "silu"), "lm_head": (128256, 2048, "logits")},
    "8b": {"qkv": (6144, 4096, "add_norm"), "o_proj": (4096, 4096, "none"), "gate_up": (28672, 4096, "add_norm"),
           "down": (4096, 14336, "silu"), "lm_head": (128256, 4096, "logits")},
    "smollm2": {"qkv": (960, 576, "add_norm"), "o_proj": (576, 576, "none"), "gate_up": (3072, 576, "add_norm"),
                "down": (576, 1536, "silu"), "lm_head": (49152, 576, "logits")},
    # one rank of Llama-3-8B at tensor_parallel=2 (column-parallel qkv / gate_up / logits, row-parallel o / down)
    "8b-tp2": {"qkv": (3072, 4096, "add_norm"), "o_proj": (4096, 2048, "none"), "gate_up": (14336, 4096, "add_norm"),
               "down": (4096, 7168, "silu"), "lm_head": (64128, 4096, "logits")},
}
MS = (1, 2, 4)
SWEEP = {1: [(bn, bk, w, 3) for bn in (2, 4, 8, 16) for bk in (256, 512, 1024) for w in (4, 8)] + [(4, 2048, 8, 3)],
         2: [(bn, bk, w, 3) for bn in (4, 8) for bk in (256, 512) for w in (4, 8)],
         4: [(bn, bk, w, 3) for bn in (4, 8) for bk in (128, 256) for w in (4, 8)],
         8: [(bn, bk, 8, 3) for bn, bk in ((2, 1024), (4, 512), (4, 1024), (8, 256))],
         16: [(bn, bk, w, 3) for bn in (16, 32, 64) for bk in (128, 256) for w in (4, 8)]}
EPS = 1e-5


def make_case(n, k, prologue, m, copies, gen):
    """(fused calls, unfused calls, cuBLAS calls, check()) for one shape; weights rotate over `copies` copies."""
    dt = torch.bfloat16
    ws = [torch.randn(n, k, device="cuda", dtype=dt, generator=gen) * k ** -0.5 for _ in range(copies)]
    x = torch.randn(m, 2 * k if prologue == "silu" else k, device="cuda", dtype=dt, generator=gen)
    res = torch.randn(m, k, device="cuda", dtype=dt, generator=gen)
    nw = 1 + 0.1 * torch.randn(k, device="cuda", dtype=dt, generator=gen)
    rows = torch.arange(m, device="cuda", dtype=torch.int32)
    plain_x = x[:, :k] if prologue == "silu" else x
    cublas = [lambda w=w: F.linear(plain_x, w) for w in ws]
    if prologue == "add_norm":
        fused = [lambda w=w: fg.norm_gemv(x, res, nw, EPS, w) for w in ws]
        unfused = [lambda w=w: F.linear(add_rms_norm(x, res, nw, EPS)[0], w) for w in ws]

        def check():
            return rel_err(fg.norm_gemv(x, res, nw, EPS, ws[0])[0], fg.ref_norm_gemv(x, res, nw, EPS, ws[0])[0])
    elif prologue == "logits":
        fused = [lambda w=w: fg.norm_gemv(x, res, nw, EPS, w, rows=rows, out_dtype=torch.float32,
                                          keep_residual=False, round_to_act=True) for w in ws]
        unfused = [lambda w=w: F.linear(add_rms_norm(x, res, nw, EPS)[0].index_select(0, rows), w).float()
                   for w in ws]

        def check():
            y, _ = fg.norm_gemv(x, res, nw, EPS, ws[0], rows=rows, out_dtype=torch.float32, keep_residual=False,
                                round_to_act=True)
            return rel_err(y, fg.ref_norm_gemv(x, res, nw, EPS, ws[0], rows=rows)[0])
    elif prologue == "silu":
        fused = [lambda w=w: fg.act_gemv(x, w) for w in ws]
        unfused = [lambda w=w: F.linear(silu_and_mul(x), w) for w in ws]

        def check():
            return rel_err(fg.act_gemv(x, ws[0]), fg.ref_act_gemv(x, ws[0]))
    else:
        fused = [lambda w=w: fg.gemv(x, w) for w in ws]
        unfused = cublas

        def check():
            return rel_err(fg.gemv(x, ws[0]), fg.ref_gemv(x, ws[0]))
    return fused, unfused, cublas, check


def with_tiles(m, tiles):
    """Force one tile config for BLOCK_M of m rows, every prologue (the sweep)."""
    block_m = fg._tile_block_m(m)
    for key in [k for k in fg.TILE_SIZES if k[:2] == ("cuda", block_m)]:
        fg.TILE_SIZES[key] = [(1 << 62, *tiles)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--models", nargs="+", default=["1b", "8b"])
    ap.add_argument("--ms", type=int, nargs="+", default=list(MS))
    ap.add_argument("--multi-row", choices=fg.MULTI_ROW_MODES, default=fg.MULTI_ROW,
                    help="how the fused kernel runs M > 1 rows (kernels_gpu.fused_gemv.MULTI_ROW)")
    args = ap.parse_args()
    fg.MULTI_ROW = args.multi_row
    gen = torch.Generator(device="cuda").manual_seed(0)
    defaults = {key: list(v) for key, v in fg.TILE_SIZES.items()}
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "multi_row": args.multi_row, "cases": [], "sweep": []}
    rows = []
    for model in args.models:
        for name, (n, k, prologue) in MODELS[model].items():
            wbytes = n * k * 2
            for m in args.ms:
                fused, unfused, cublas, check = make_case(n, k, prologue, m, n_copies(wbytes, m), gen)
                best = None
                configs = SWEEP.get(fg._tile_block_m(m), SWEEP[1]) if args.sweep else [None]
                for tiles in configs:
                    if tiles is not None:
                        with_tiles(m, tiles)
                    try:
                        err = check()
                        ms = bench_graph(fused)
                    except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported
                        results["sweep"].append({"model": model, "proj": name, "M": m, "tiles": tiles,
                                                 "error": repr(e)[:200]})
                        continue
                    results["sweep"].append({"model": model, "proj": name, "M": m, "tiles": tiles, "ms": ms,
                                             "err": err})
                    if best is None or ms < best[0]:
                        best = (ms, tiles, err)
                fg.TILE_SIZES.clear()
                fg.TILE_SIZES.update({key: list(v) for key, v in defaults.items()})
                default_ms = bench_graph(fused) if args.sweep else best[0]
                t_unfused, t_cublas = bench_graph(unfused), bench_graph(cublas)
                row = {"model": model, "proj": name, "prologue": prologue, "M": m, "N": n, "K": k,
                       "fused_ms": default_ms, "best_ms": best[0], "best_tiles": best[1], "rel_err": best[2],
                       "unfused_ms": t_unfused, "cublas_ms": t_cublas}
                results["cases"].append(row)
                rows.append(row)
                print(f"{model} {name:8s} M={m}: fused {default_ms * 1e3:7.1f} us (best {best[0] * 1e3:7.1f} us "
                      f"{best[1]}), unfused {t_unfused * 1e3:7.1f} us, cuBLAS {t_cublas * 1e3:7.1f} us, "
                      f"err {best[2]:.1e}", flush=True)
    out_dir = Path(os.environ.get("OUT") or "bench_results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_fused_gemv.json").write_text(json.dumps(results, indent=2))
    print("\n| model | proj | prologue | M | fused us | TB/s | best us (tiles) | unfused us | cuBLAS us | "
          "vs unfused | vs cuBLAS |")
    print("| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        tbps = r["N"] * r["K"] * 2 / (r["fused_ms"] * 1e-3) / 1e12
        print(f"| {r['model']} | {r['proj']} | {r['prologue']} | {r['M']} | {r['fused_ms'] * 1e3:.1f} | {tbps:.2f} | "
              f"{r['best_ms'] * 1e3:.1f} {r['best_tiles']} | {r['unfused_ms'] * 1e3:.1f} | {r['cublas_ms'] * 1e3:.1f} | "
              f"{r['unfused_ms'] / r['fused_ms']:.2f}x | {r['cublas_ms'] / r['fused_ms']:.2f}x |")


if __name__ == "__main__":
    main()
