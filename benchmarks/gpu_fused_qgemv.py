"""Batch-1 quantized GEMVs with the producer fused in (kernels_gpu.fused_qgemv) vs what they replace, on one GPU,
same run.

For each projection of a Llama-3.2-1B-shaped (and a Llama-3-8B-shaped) layer at M = 1, per weight scheme (int4 group
128, nvfp4, int8):
  unfused  the CUDA backend's path before this kernel: the producer kernel (add_rms_norm / silu_and_mul, or nothing)
           then quant_linear's GEMV (split-K: an f32 buffer zeroed, atomics, a copy into the output); the logits also
           index_select and the f32 cast
  fused    one fused_qgemv launch (split-K with the last-arriving split finishing each tile: no memset, no copy)
  MMA      quant_linear's tensor-core decode tiles at M = 1 (the row padded to 16; no prologue): the alternative
  cuBLAS   bf16 F.linear over the dense weight (the peer: what reading the unquantized weight costs)
Each case is a CUDA graph of calls rotating between copies of the weight (together past the 50 MB L2), median of
25 replays, per call (benchmarks/gpu_linear.py's method); consecutive fused launches overlap through PDL as they do
in a decode step. Every fused output is checked against its float64 reference in the same run. Rates are TB/s of
the quantized weight's bytes (scales included).

  --sweep   first times a grid of tiles (BLOCK_N, BLOCK_K, warps), then split-K targets and PDL / prefetch for the
            best tile, per (scheme, projection), and uses the best for the table (the JSON keeps the whole grid)

Prints a table last; writes JSON to $OUT/gpu_fused_qgemv.json (or ./bench_results/).
    PYTHONPATH=. python3 benchmarks/gpu_fused_qgemv.py [--sweep] [--models 1b 8b] [--schemes int4 nvfp4 int8]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gpu_fused_gemv import MODELS
from benchmarks.gpu_linear import bench_graph, n_copies, rel_err
from kernels_gpu import fused_gemv as fg
from kernels_gpu import fused_qgemv as fq
from kernels_gpu import quant_linear as ql
from kernels_gpu.activations import silu_and_mul
from kernels_gpu.norms import add_rms_norm

EPS = 1e-5
TILES = [(bn, bk, 4) for bn in (4, 8, 16) for bk in (256, 512, 1024)] + [(8, 512, 8), (16, 512, 8)]
SPLITS = (0, 264, 528, 1056)  # SPLIT_K_PROGRAMS (0: never split)
PDL_MODES = ((True, True), (True, False), (False, False))  # (PDL, PREFETCH)


def make_case(n, k, prologue, scheme, copies, gen):
    """(fused(cfg) -> calls, unfused calls, cuBLAS calls, check(cfg), quantized bytes) for one shape."""
    dt = torch.bfloat16
    dense = [torch.randn(n, k, device="cuda", dtype=dt, generator=gen) * k ** -0.5 for _ in range(copies)]
    qws = [ql.quantize_weight(w, scheme) for w in dense]
    refs = ql.dequantize_weight(qws[0])
    x = torch.randn(1, 2 * k if prologue == "silu" else k, device="cuda", dtype=dt, generator=gen)
    res = torch.randn(1, k, device="cuda", dtype=dt, generator=gen)
    nw = 1 + 0.1 * torch.randn(k, device="cuda", dtype=dt, generator=gen)
    rows = torch.zeros(1, device="cuda", dtype=torch.int32)
    plain_x = x[:, :k] if prologue == "silu" else x
    cublas = [lambda w=w: F.linear(plain_x, w) for w in dense]
    ws = fq.Workspace("cuda")
    if prologue == "add_norm":
        def one(qw, cfg):
            return fq.norm_qgemv(x, res, nw, EPS, qw, workspace=ws, config=cfg)[0]

        unfused = [lambda qw=qw: ql.quant_linear(add_rms_norm(x, res, nw, EPS)[0], qw) for qw in qws]
        want = fg.ref_norm_gemv(x, res, nw, EPS, refs)[0]
    elif prologue == "logits":
        def one(qw, cfg):
            return fq.norm_qgemv(x, res, nw, EPS, qw, rows=rows, out_dtype=torch.float32, keep_residual=False,
                                 round_to_act=True, workspace=ws, config=cfg)[0]

        unfused = [lambda qw=qw: ql.quant_linear(add_rms_norm(x, res, nw, EPS)[0].index_select(0, rows), qw).float()
                   for qw in qws]
        want = fg.ref_norm_gemv(x, res, nw, EPS, refs, rows=rows)[0]
    elif prologue == "silu":
        def one(qw, cfg):
            return fq.act_qgemv(x, qw, workspace=ws, config=cfg)

        unfused = [lambda qw=qw: ql.quant_linear(silu_and_mul(x), qw) for qw in qws]
        want = fg.ref_act_gemv(x, refs)
    else:
        def one(qw, cfg):
            return fq.qgemv(x, qw, workspace=ws, config=cfg)

        unfused = [lambda qw=qw: ql.quant_linear(x, qw) for qw in qws]
        want = fg.ref_gemv(x, refs)

    # the tensor-core alternative at M = 1: quant_linear's decode GEMM tiles (the row padded to 16), no prologue
    mma = [lambda qw=qw: ql.quant_linear(plain_x, qw, config={"GEMV_MAX_M": 0}) for qw in qws]

    def fused(cfg):
        return [lambda qw=qw: one(qw, cfg) for qw in qws]

    def check(cfg):
        return rel_err(one(qws[0], cfg), want)

    return fused, unfused, cublas, mma, check, qws[0].nbytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--models", nargs="+", default=["1b", "8b"])
    ap.add_argument("--schemes", nargs="+", default=["int4", "nvfp4", "int8"])
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cases": [], "sweep": []}
    rows = []
    for scheme in args.schemes:
        for model in args.models:
            for name, (n, k, prologue) in MODELS[model].items():
                qbytes = n * k // (1 if scheme == "int8" else 2)
                fused, unfused, cublas, mma, check, nbytes = make_case(n, k, prologue, scheme,
                                                                       n_copies(qbytes, 1), gen)

                def trial(cfg, tag):
                    try:
                        err = check(cfg)
                        ms = bench_graph(fused(cfg))
                    except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported
                        results["sweep"].append({"scheme": scheme, "model": model, "proj": name, "cfg": cfg,
                                                 "error": repr(e)[:200]})
                        return None
                    results["sweep"].append({"scheme": scheme, "model": model, "proj": name, "cfg": cfg, "ms": ms,
                                             "err": err, "stage": tag})
                    return ms, err

                base = trial(None, "default")
                best = (base[0], {}, base[1])
                if args.sweep:
                    for bn, bk, w in TILES:
                        cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w}
                        got = trial(cfg, "tiles")
                        if got is not None and got[0] < best[0]:
                            best = (got[0], cfg, got[1])
                    tile = dict(best[1])
                    for split in SPLITS:
                        for pdl, prefetch in PDL_MODES:
                            cfg = dict(tile, SPLIT_K_PROGRAMS=split, PDL=pdl, PREFETCH=prefetch)
                            got = trial(cfg, "split_pdl")
                            if got is not None and got[0] < best[0]:
                                best = (got[0], cfg, got[1])
                t_unfused, t_cublas, t_mma = bench_graph(unfused), bench_graph(cublas), bench_graph(mma)
                row = {"scheme": scheme, "model": model, "proj": name, "prologue": prologue, "N": n, "K": k,
                       "bytes": nbytes, "fused_ms": base[0], "best_ms": best[0], "best_cfg": best[1],
                       "rel_err": base[1], "unfused_ms": t_unfused, "cublas_ms": t_cublas, "mma_ms": t_mma}
                results["cases"].append(row)
                rows.append(row)
                print(f"{scheme} {model} {name:8s}: fused {base[0] * 1e3:7.1f} us (best {best[0] * 1e3:7.1f} us "
                      f"{best[1]}), unfused {t_unfused * 1e3:7.1f} us, MMA tiles {t_mma * 1e3:7.1f} us, "
                      f"cuBLAS bf16 {t_cublas * 1e3:7.1f} us, "
                      f"err {base[1]:.1e}", flush=True)
    out_dir = Path(os.environ.get("OUT") or "bench_results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_fused_qgemv.json").write_text(json.dumps(results, indent=2))
    print("\n| scheme | model | proj | prologue | fused us | TB/s | best us | unfused us | MMA tiles us | "
          "cuBLAS bf16 us | vs unfused | vs cuBLAS |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        tbps = r["bytes"] / (r["fused_ms"] * 1e-3) / 1e12
        print(f"| {r['scheme']} | {r['model']} | {r['proj']} | {r['prologue']} | {r['fused_ms'] * 1e3:.1f} | "
              f"{tbps:.2f} | {r['best_ms'] * 1e3:.1f} | {r['unfused_ms'] * 1e3:.1f} | {r['mma_ms'] * 1e3:.1f} | "
              f"{r['cublas_ms'] * 1e3:.1f} | "
              f"{r['unfused_ms'] / r['fused_ms']:.2f}x | {r['cublas_ms'] / r['fused_ms']:.2f}x |")


if __name__ == "__main__":
    main()
