"""Microbenchmark: native GGUF matmul (lowering/backends/cpu_native) vs XLA:CPU f32 `x @ w.T` on the
dequantized weights, for SmolLM2-135M's linear shapes at the decode batch sizes.

Each case cycles over enough distinct weight copies (> --f32-mb MB of f32 in all) that the weights come from
DRAM, not cache, for both variants. One jitted call runs --group matmuls in a chain (x of the next one
depends on the previous output), so per-call dispatch is amortized as inside a model's graph. The two
variants are timed back to back on each group of copies (order alternating); per-matmul median and min
and the median of the paired speedups are reported.
Prints a table and writes JSON (default bench_results/cpu_native_matmul.json).
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

# (name, N, K, format): fused qkv, o_proj, fused gate/up, down_proj, logits
SHAPES = (("qkv", 960, 576, "q4_1"), ("o_proj", 576, 576, "q4_1"), ("gate_up", 3072, 576, "q4_1"),
          ("down", 576, 1536, "q4_1"), ("logits", 49152, 576, "q8_0"))


def random_parts(rng, n, k, fmt):
    from lowering.quant import formats

    d = (rng.normal(size=(n, k // 32)) * 0.01).astype(np.float16)
    if fmt == "q4_1":
        q = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
        m = (-8 * d.astype(np.float32)).astype(np.float16)
        return [q, d, m], formats.dequantize_gguf({"q": q, "d": d, "m": m}, "q4_1")
    q = rng.integers(-127, 128, (n, k), dtype=np.int8)
    return [q, d], formats.dequantize_gguf({"q": q, "d": d}, "q8_0")


def bench_case(n, k, fmt, m_rows, *, f32_mb, group, passes, rng):
    import jax
    import jax.numpy as jnp

    from lowering.backends import cpu_native as cn

    copies = max(group, -(-int(f32_mb * 2**20) // (n * k * 4)))
    copies = -(-copies // group) * group
    quant, dense = [], []
    for i in range(copies):
        if i < 2:
            parts, w = random_parts(rng, n, k, fmt)
            base_parts, base_w = parts, w
        else:  # distinct memory, same values (cheap to make)
            parts, w = [p.copy() for p in base_parts], base_w.copy()
        quant.append([jnp.asarray(p) for p in parts])
        dense.append(jnp.asarray(w))
    del base_parts, base_w
    x = jnp.asarray(rng.normal(size=(m_rows, k)).astype(np.float32))

    def chain(mm):
        def run(x, *ws):
            for w in ws:
                y = mm(x, w)
                x = x + 0.0 * jnp.sum(y)  # the next product waits for this one
            return x
        return jax.jit(run)

    nparts = len(quant[0])
    ours = chain(lambda x, w: cn.gguf_matmul(x, *w, format=fmt))
    xla = chain(lambda x, w: jnp.dot(x, w.T))
    ours_groups = [[quant[i] for i in range(g, g + group)] for g in range(0, copies, group)]
    xla_groups = [dense[g:g + group] for g in range(0, copies, group)]
    # check once that they agree
    ref = x @ dense[0].T
    got = cn.gguf_matmul(x, *quant[0], format=fmt)
    err = float(jnp.max(jnp.abs(got - ref)) / (jnp.max(jnp.abs(ref)) + 1e-30))
    for f, gs in ((ours, ours_groups), (xla, xla_groups)):  # compile + warm
        f(x, *gs[0]).block_until_ready()
    # paired timing: each group of copies is timed with both variants back to back (order alternating), so
    # load from other processes hits both alike; the speedup is the median of the paired ratios
    times = {"native": [], "xla_f32": []}
    ratios = []
    for p in range(passes):
        for gi in range(len(ours_groups)):
            pair = {}
            order = (("native", ours, ours_groups[gi]), ("xla_f32", xla, xla_groups[gi]))
            for name, f, g in (order if (p + gi) % 2 == 0 else order[::-1]):
                start = time.perf_counter()
                f(x, *g).block_until_ready()
                pair[name] = (time.perf_counter() - start) / group * 1e3
                times[name].append(pair[name])
            ratios.append(pair["xla_f32"] / pair["native"])
    del nparts
    quant_mb = sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in quant[0]) * copies / 2**20
    res = {"copies": copies, "f32_mb_total": n * k * 4 * copies / 2**20, "quant_mb_total": quant_mb,
           "max_rel_err_vs_xla": err}
    for name, ts in times.items():
        res[f"{name}_ms_median"] = float(np.median(ts))
        res[f"{name}_ms_min"] = float(np.min(ts))
    res["speedup_median_of_pairs"] = float(np.median(ratios))
    res["speedup_of_mins"] = res["xla_f32_ms_min"] / res["native_ms_min"]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--f32-mb", type=float, default=420.0, help="f32 weight copies per case (MB): > caches")
    ap.add_argument("--group", type=int, default=4, help="matmuls per jitted call")
    ap.add_argument("--passes", type=int, default=7)
    ap.add_argument("--shapes", nargs="*", default=None, help="subset of shape names")
    ap.add_argument("--out", default="bench_results/cpu_native_matmul.json")
    args = ap.parse_args()

    from lowering.backends import cpu_native as cn

    if not cn.available():
        raise SystemExit(f"native kernels unavailable: {cn.unavailable_reason()}")
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'shape':8} {'N x K':>11} {'fmt':5} {'M':>2} {'copies':>6} {'native ms':>17} {'xla f32 ms':>17} "
          f"{'speedup':>8} {'min/min':>8}")
    print(f"{'':38} {'median (min)':>17} {'median (min)':>17} {'(paired)':>8}")
    for name, n, k, fmt in SHAPES:
        if args.shapes and name not in args.shapes:
            continue
        for m_rows in args.m:
            r = bench_case(n, k, fmt, m_rows, f32_mb=args.f32_mb, group=args.group, passes=args.passes, rng=rng)
            r.update(shape=name, n=n, k=k, format=fmt, m=m_rows)
            rows.append(r)
            print(f"{name:8} {f'{n}x{k}':>11} {fmt:5} {m_rows:>2} {r['copies']:>6} "
                  f"{r['native_ms_median']:>8.4f} ({r['native_ms_min']:.4f}) "
                  f"{r['xla_f32_ms_median']:>8.4f} ({r['xla_f32_ms_min']:.4f}) "
                  f"{r['speedup_median_of_pairs']:>7.2f}x {r['speedup_of_mins']:>7.2f}x", flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except OSError:
        commit = ""
    out = {"date": datetime.date.today().isoformat(), "commit": commit, "machine": platform.machine(),
           "cpus": os.cpu_count(), "avx512": cn.uses_avx512(), "group": args.group, "passes": args.passes,
           "note": "shared machine (other jobs running): timings are noisy; variants timed back to back per group",
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
