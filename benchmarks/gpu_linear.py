"""Quantized linear layers on one GPU: llmc's Triton kernels (fp8 W8A8, int8 / int4 / nvfp4 weight-only) vs
cuBLAS bf16 (F.linear) and, for fp8, torch._scaled_mm with row-wise scales -- same run, same data.

Llama-3.2-1B projection shapes (fused qkv, o_proj, fused gate_up, down, lm_head), M in {1, 16, 64, 4096}.
Each case is timed as a CUDA graph of several calls that rotate between copies of the weight (enough copies
that they do not fit the 50 MB L2 together), replayed >= 20 times; the median replay time / calls is reported.
Every implementation's output is checked against its float64 reference in the same run. Rates: TB/s of
weight bytes read for M <= 64, TFLOP/s for M = 4096; speedup is cuBLAS bf16 time / time.
Prints a table last; writes JSON to $OUT/gpu_linear.json (or ./bench_results/).
  --sweep [SECONDS]  first times a grid of tile configs on a few shapes (writes gpu_linear_sweep.json)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels_gpu.quant_linear import (quant_linear, quantize_activation_fp8, quantize_weight, ref_quant_linear)

SHAPES = {  # name: (N, K)
    "qkv": (3072, 2048),
    "o_proj": (2048, 2048),
    "gate_up": (16384, 2048),
    "down": (2048, 8192),
    "lm_head": (128256, 2048),
}
MS = (1, 16, 64, 4096)
SCHEMES = ("fp8", "int8", "int4", "nvfp4")
L2_FLUSH_BYTES = 150e6  # rotate between copies until the working set is 3x the 50 MB L2
CHECK_ROWS = 64


def bench_graph(calls, reps=25):
    """calls: list of zero-arg callables (one rotation). Median ms per call over reps graph replays."""
    for f in calls:  # warm-up / compile
        f()
    torch.cuda.synchronize()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for f in calls:
                f()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for f in calls:
                f()
        run = graph.replay
    except Exception:  # noqa: BLE001 - fall back to eager launches
        torch.cuda.synchronize()

        def run():
            for f in calls:
                f()
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    times.sort()
    return times[len(times) // 2]


def n_copies(nbytes, m):
    n = min(64, max(1, math.ceil(L2_FLUSH_BYTES / nbytes)))
    return max(n, 2 if m >= 4096 else 8)  # calls per graph


def rel_err(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def qw_copies(qw, n):
    copies = [qw]
    for _ in range(n - 1):
        copies.append(type(qw)(qw.scheme, qw.out_features, qw.in_features,
                               {k: v.clone() for k, v in qw.tensors.items()}, qw.group_size))
    return copies


def sweep(seconds, res):
    """Time tile configs for decode (M=1, 16) and prefill (M=4096) on two shapes; fastest per case first."""
    t_end = time.time() + seconds
    gen = torch.Generator(device="cuda").manual_seed(1)
    gemv = [{"GEMV_BLOCK_N": bn, "GEMV_BLOCK_K": bk, "GEMV_WARPS": nw, "SPLIT_K_PROGRAMS": sp, "GEMV_WORDS": wd}
            for bn, bk, nw, sp, wd in ((16, 512, 4, 528, False), (16, 512, 4, 528, True), (16, 1024, 4, 528, True),
                                       (32, 512, 4, 528, True), (8, 512, 4, 528, True), (16, 256, 4, 528, True),
                                       (32, 1024, 8, 528, True), (16, 512, 2, 528, True),
                                       (16, 512, 4, 1056, True), (16, 512, 4, 264, True))]
    decode = [{"GEMV_MAX_M": 0, "MODE": mode, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns,
               "target_programs": 0, "MIN_BLOCK_N": bn}
              for mode, bn, bk, nw, ns in ((1, 64, 128, 4, 4), (1, 64, 256, 4, 4), (0, 64, 128, 4, 4))]
    prefill = {
        "fp8": [(128, 256, 128, 0, 8, 3), (128, 256, 128, 0, 8, 4), (256, 128, 128, 0, 8, 4), (128, 256, 64, 0, 8, 5),
                (128, 128, 128, 0, 8, 5), (128, 128, 256, 0, 8, 3)],
        "w": [(128, 128, 64, 1, 8, 4), (128, 256, 64, 1, 8, 3), (128, 128, 128, 1, 8, 3)],
    }
    out = []
    for shape in ("gate_up", "down"):
        n, k = SHAPES[shape]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        for scheme in ("int4", "nvfp4", "fp8", "int8"):
            qw = quantize_weight(w, scheme)
            for m in (1, 16, 4096):
                if time.time() > t_end:
                    break
                if m == 4096 and shape == "down":
                    continue
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
                copies = qw_copies(qw, n_copies(qw.nbytes, m))
                if m == 1:
                    cfgs = gemv if scheme in ("int4", "nvfp4") else [c for c in gemv if c["GEMV_WORDS"]]
                elif m <= 16:
                    cfgs = decode
                else:
                    cfgs = [dict(BLOCK_M=a, BLOCK_N=b, BLOCK_K=c, MODE=mo, num_warps=nw, num_stages=ns, GROUP_M=8)
                            for a, b, c, mo, nw, ns in prefill["fp8" if scheme == "fp8" else "w"]]
                for cfg in cfgs:
                    if time.time() > t_end:
                        break
                    try:
                        y = quant_linear(x[:CHECK_ROWS], qw, config=cfg)
                        err = rel_err(y, ref_quant_linear(x[:CHECK_ROWS], qw))
                        ms = bench_graph([lambda c=c: quant_linear(x, c, config=cfg) for c in copies], reps=20)
                    except Exception as e:  # noqa: BLE001
                        out.append({"shape": shape, "scheme": scheme, "M": m, "cfg": cfg, "error": repr(e)[:200]})
                        print("sweep", shape, scheme, m, cfg, "ERROR", repr(e)[:200], flush=True)
                        continue
                    rate = qw.nbytes / ms / 1e9 if m <= 64 else 2 * m * n * k / ms / 1e9
                    out.append({"shape": shape, "scheme": scheme, "M": m, "cfg": cfg, "ms": ms, "rate": rate,
                                "rel_err": err})
                    print(f"sweep {shape:8s} {scheme:5s} M={m:<5d} {ms:8.4f} ms {rate:8.2f} "
                          f"{'TB/s' if m <= 64 else 'TFLOP/s'} err {err:.1e} {cfg}", flush=True)
    res["sweep"] = out
    best = {}
    for r in out:
        if "ms" in r and r["rel_err"] < 5e-2:
            key = (r["shape"], r["scheme"], r["M"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    print("\nsweep best:")
    for key, r in sorted(best.items()):
        print(f"  {key}: {r['ms']:.4f} ms {r['cfg']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", type=float, nargs="?", const=120.0, default=0.0)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "bench_results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cases": []}
    try:
        import triton
        res["triton"] = triton.__version__
    except ImportError:
        pass
    if args.sweep:
        sweep(args.sweep, res)
        (out_dir / "gpu_linear_sweep.json").write_text(json.dumps(res, indent=1, default=str))
        res.pop("sweep")

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    aq_rows = []
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        qws = {s: quantize_weight(w, s) for s in SCHEMES}
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            xc = x[:CHECK_ROWS]
            flops = 2 * m * n * k

            def record(impl, ms, nbytes, err, extra=None):
                case = {"shape": shape, "N": n, "K": k, "M": m, "impl": impl, "ms": ms, "weight_bytes": nbytes,
                        "rel_err": err, "speedup_vs_bf16": bf16_ms / ms if ms else None}
                case["TBps" if m <= 64 else "TFLOPs"] = (nbytes / ms / 1e9) if m <= 64 else flops / ms / 1e9
                case.update(extra or {})
                res["cases"].append(case)
                rows.append(case)
                print(f"  {shape} M={m} {impl}: {ms:.4f} ms err {err:.1e}", flush=True)

            # cuBLAS bf16
            wb = [w] + [w.clone() for _ in range(n_copies(w.numel() * 2, m) - 1)]
            ref = xc.double() @ w.double().t()
            err = rel_err(F.linear(xc, w), ref)
            bf16_ms = bench_graph([lambda c=c: F.linear(x, c) for c in wb])
            record("cublas_bf16", bf16_ms, w.numel() * 2, err)
            del wb
            for scheme in SCHEMES:
                qw = qws[scheme]
                try:
                    err = rel_err(quant_linear(xc, qw), ref_quant_linear(xc, qw))
                    copies = qw_copies(qw, n_copies(qw.nbytes, m))
                    ms = bench_graph([lambda c=c: quant_linear(x, c) for c in copies])
                    record(f"llmc_{scheme}", ms, qw.nbytes, err)
                except Exception as e:  # noqa: BLE001 - one failing scheme must not lose the rest
                    res["cases"].append({"shape": shape, "M": m, "impl": f"llmc_{scheme}", "error": repr(e)[:300]})
                    print(f"  {shape} M={m} llmc_{scheme}: ERROR {e!r}"[:400], flush=True)
                    continue
                if scheme == "fp8" and hasattr(torch, "_scaled_mm"):
                    wq, ws = qw.tensors["weight"], qw.tensors["scale"]

                    def scaled_mm(xx, wq=wq, ws=ws):
                        xq, xs = quantize_activation_fp8(xx)
                        return torch._scaled_mm(xq, wq.t(), scale_a=xs[:, None], scale_b=ws[None, :],
                                                out_dtype=torch.bfloat16)
                    try:
                        err = rel_err(scaled_mm(xc), ref_quant_linear(xc, qw))
                        ms = bench_graph([lambda: scaled_mm(x)] * len(copies))  # NOTE: same weight (no copies)
                        record("torch_scaled_mm_fp8", ms, qw.nbytes, err, {"note": "incl. llmc act quant; "
                                                                            "no weight rotation"})
                    except Exception as e:  # noqa: BLE001
                        res["cases"].append({"shape": shape, "M": m, "impl": "torch_scaled_mm_fp8",
                                             "error": repr(e)[:300]})
                        print(f"  {shape} M={m} _scaled_mm: ERROR {e!r}"[:400], flush=True)
                    if m == 4096:  # the activation quantizer alone (part of both fp8 rows above)
                        ms = bench_graph([lambda: quantize_activation_fp8(x)] * 4)
                        res["cases"].append({"shape": shape, "M": m, "impl": "fp8_act_quant_only", "ms": ms,
                                             "GBps": x.numel() * 3 / ms / 1e6})
                        aq_rows.append((shape, m, ms, x.numel() * 3 / ms / 1e6))
                del copies
            torch.cuda.empty_cache()
        del qws, w
        torch.cuda.empty_cache()

    # summary against the targets
    summ = {}
    for scheme in ("int4", "nvfp4", "int8", "fp8"):
        sp = [c["speedup_vs_bf16"] for c in rows if c["impl"] == f"llmc_{scheme}" and c["M"] == 1]
        if sp:
            summ[f"{scheme}_M1_geomean_speedup"] = math.exp(sum(map(math.log, sp)) / len(sp))
    sp = [c["speedup_vs_bf16"] for c in rows if c["impl"] == "llmc_fp8" and c["M"] == 4096]
    if sp:
        summ["fp8_M4096_geomean_speedup"] = math.exp(sum(map(math.log, sp)) / len(sp))
    res["summary"] = summ
    (out_dir / "gpu_linear.json").write_text(json.dumps(res, indent=1))

    print(f"\n{res['device']}, torch {res['torch']}, triton {res.get('triton')}, {res['date']}")
    print(f"{'shape':<8} {'N':>6} {'K':>5} {'M':>5} {'impl':<20} {'ms':>9} {'rate':>14} {'vs bf16':>8} {'rel err':>8}")
    for c in rows:
        rate = f"{c['TBps']:.2f} TB/s" if "TBps" in c else f"{c['TFLOPs']:.0f} TFLOP/s"
        print(f"{c['shape']:<8} {c['N']:>6} {c['K']:>5} {c['M']:>5} {c['impl']:<20} {c['ms']:>9.4f} {rate:>14} "
              f"{c['speedup_vs_bf16']:>7.2f}x {c['rel_err']:>8.1e}")
    for shape, m, ms, gbps in aq_rows:
        print(f"fp8 activation quantizer alone, {shape} M={m}: {ms:.4f} ms ({gbps:.0f} GB/s read+write)")
    for key, v in summ.items():
        print(f"{key}: {v:.2f}x")


if __name__ == "__main__":
    main()
