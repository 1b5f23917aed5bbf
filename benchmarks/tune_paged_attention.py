"""Sweep paged-attention tile sizes on the GPU for one case; prints the best configs (a tuning aid).

Run on the device: PYTHONPATH=. python3 benchmarks/tune_paged_attention.py [--phase decode|prefill]
    [--formats bf16,fp8,nvfp4] [--workers 8] [--quick] [--kernel unified|grouped]
Configs are compiled first by --workers processes in parallel (they fill Triton's on-disk cache), then timed
one after another in this process; every output is checked against the float64 reference (first two
sequences, computed once per format). Results feed TILE_SIZES / FORMAT_OVERRIDES (--kernel unified:
paged_attention_kernel, which one-token decode steps of bf16/fp8 pools no longer use) or GROUPED_DECODE
(--kernel grouped, decode phase, bf16/fp8) at the top of kernels_gpu/paged_attention.py. Writes $OUT/tune_paged_attention.json when OUT is set.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import multiprocessing as mp
import os
import time

import torch

from benchmarks.gpu_attention import bench, paged_case
from kernels_gpu import paged_attention as pa

DECODE_CASE = (64, 4096, 1, 32, 8, 128, 16)
PREFILL_CASE = (4, 4096, 4096, 32, 32, 128, 16)


def configs(phase: str, quick: bool, fmt: str, kernel: str = "unified"):
    """(tile dict, num_splits) pairs to try; grouped-kernel tiles carry an "HG" key."""
    if kernel == "grouped":
        for hg, block_n, warps, stages in itertools.product([1, 2, 4, 8], [16, 32, 64], [4, 8], [2, 3, 4]):
            if hg * block_n > 256 or (quick and stages != 3):
                continue
            for splits in (1, 2):
                yield {"HG": hg, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}, splits
        return
    if phase == "decode":
        for block_n, warps, stages, maxnreg, order in itertools.product(
                [64, 128], [4, 8], [2, 3, 4], [None, 128], [0, 1]):
            if maxnreg and warps != 4:
                continue
            if quick and (block_n != 64 or stages != 3):
                continue
            tiles = {"BLOCK_M": 16, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages,
                     "grid_order": order, "maxnreg": maxnreg}
            for splits in (1, 2):
                yield tiles, splits
    else:
        for block_m, block_n, warps, stages in itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3, 4]):
            yield {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}, 1


def make_case(phase, fmt, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    args, kw, _, kv_bytes = paged_case(*(DECODE_CASE if phase == "decode" else PREFILL_CASE), fmt, gen)
    return args, kw, kv_bytes


def light_case(phase, fmt):
    """Same shapes, dtypes and strides as make_case (so the same kernel specializations), arbitrary values."""
    num_seqs, ctx, q_len, hq, hkv, d, block_size = DECODE_CASE if phase == "decode" else PREFILL_CASE
    blocks_per_seq = ctx // block_size
    num_blocks = num_seqs * blocks_per_seq + 1
    dev = "cuda"
    stored = {"bf16": (torch.bfloat16, d), "fp8": (torch.float8_e4m3fn, d), "nvfp4": (torch.uint8, d // 2)}[fmt]
    k_pool = torch.zeros(num_blocks, block_size, hkv, stored[1] * stored[0].itemsize, device=dev,
                         dtype=torch.uint8).view(stored[0])
    v_pool = torch.zeros_like(k_pool)
    tables = (torch.arange(num_seqs * blocks_per_seq, device=dev) + 1).view(num_seqs, blocks_per_seq).to(torch.int32)
    extra = {}
    if fmt == "fp8":
        extra = dict(k_scale=torch.ones(hkv, device=dev), v_scale=torch.ones(hkv, device=dev))
    elif fmt == "nvfp4":
        bs = torch.zeros(num_blocks, block_size, hkv, d // 16, device=dev, dtype=torch.uint8).view(torch.float8_e4m3fn)
        extra = dict(k_scale=torch.ones((), device=dev), v_scale=torch.ones((), device=dev),
                     k_block_scale=bs, v_block_scale=bs.clone())
    q = torch.zeros(num_seqs * q_len, hq, d, device=dev, dtype=torch.bfloat16)
    query_start = (torch.arange(num_seqs + 1, device=dev) * q_len).to(torch.int32)
    seq_lens = torch.full((num_seqs,), ctx, device=dev, dtype=torch.int32)
    kw = dict(scale=1 / math.sqrt(d), kv_format=fmt, max_q_len=q_len, max_seq_len=ctx, **extra)
    return (q, k_pool, v_pool, query_start, seq_lens, tables), kw


@contextlib.contextmanager
def _set_key(table, key, value):
    """table[key] = value (None: no entry) for the duration of the block."""
    original = table.get(key)
    if value is None:
        table.pop(key, None)
    else:
        table[key] = value
    try:
        yield
    finally:
        if original is None:
            table.pop(key, None)
        else:
            table[key] = original


@contextlib.contextmanager
def tiles_for(phase, fmt, tiles):
    """Make `tiles` the D=128 tiles of (phase, fmt): GROUPED_DECODE for grouped-kernel tiles ("HG" key), else
    the most specific FORMAT_OVERRIDES key (with the grouped kernel switched off)."""
    if "HG" in tiles:
        with _set_key(pa.GROUPED_DECODE, ("cuda", 128, fmt), tiles):
            yield
    else:
        with _set_key(pa.FORMAT_OVERRIDES, ("cuda", 128, phase, fmt), tiles), \
                _set_key(pa.GROUPED_DECODE, ("cuda", 128, fmt), None):
            yield


def run_config(args, kw, tiles, splits, phase):
    with tiles_for(phase, kw["kv_format"], tiles):
        out = torch.full_like(args[0], float("nan"))
        pa.paged_attention(*args, out=out, num_splits=splits, **kw)
        return out


def _compile_worker(job):
    """Runs each config once so its kernel lands in Triton's on-disk cache."""
    phase, fmt, items = job[:3]
    torch.cuda.set_device(0)
    args, kw = light_case(phase, fmt)
    failed = []
    for tiles, splits in items:
        try:
            run_config(args, kw, tiles, splits, phase)
        except Exception as e:  # noqa: BLE001 - reported again by the timing pass
            failed.append(f"{fmt} {tiles}: {str(e)[:200]}")
    torch.cuda.synchronize()
    return failed


def reference(args, kw):
    """f64 reference on the first two sequences."""
    q, k_pool, v_pool, qs, sl, bt = args
    rows = int(qs[2])
    return rows, pa.ref_paged_attention(q[:rows], k_pool, v_pool, qs[:3], sl[:2], bt[:2], **kw)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--phase", default="decode", choices=["decode", "prefill"])
    parser.add_argument("--formats", default="bf16")
    parser.add_argument("--kv-format", default=None, help="alias of --formats with one format")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--kernel", default="unified", choices=["unified", "grouped"],
                        help="grouped: paged_decode_grouped_kernel tiles (decode, bf16/fp8)")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--compile-only", action="store_true", help="fill the Triton cache and stop")
    opts = parser.parse_args()
    formats = (opts.kv_format or opts.formats).split(",")

    t0 = time.time()
    if opts.workers > 1:
        jobs = []
        for fmt in formats:
            # one job per compiled variant (configs differing only in the split count share a kernel)
            seen = {}
            for tiles, splits in configs(opts.phase, opts.quick, fmt, opts.kernel):
                seen.setdefault((tuple(sorted(tiles.items())), splits > 1), (tiles, splits))
            items = list(seen.values())
            jobs += [(opts.phase, fmt, items[i::opts.workers]) for i in range(opts.workers)]
        with mp.get_context("spawn").Pool(opts.workers) as pool:
            failed = sum(pool.map(_compile_worker, jobs, chunksize=1), [])
        print(f"compiled {sum(len(j[2]) for j in jobs)} kernels in {time.time() - t0:.0f} s ({len(failed)} failed)",
              flush=True)
        for msg in failed[:3]:
            print("  failed:", msg)
    if opts.compile_only:
        return

    results = {}
    for fmt in formats:
        args, kw, kv_bytes = make_case(opts.phase, fmt)
        rows, ref = reference(args, kw)
        rows_out = []
        for tiles, splits in configs(opts.phase, opts.quick, fmt, opts.kernel):
            name = " ".join(f"{k}={v}" for k, v in tiles.items() if v is not None) + f" splits={splits}"
            try:
                out = run_config(args, kw, tiles, splits, opts.phase)
                err = float((out[:rows].double() - ref).norm() / ref.norm())
                if not math.isfinite(err) or err > 2e-2:
                    raise RuntimeError(f"wrong result, rel err {err}")
                with tiles_for(opts.phase, fmt, tiles):
                    ms = bench(lambda: pa.paged_attention(*args, out=out, num_splits=splits, **kw), warm=3, rep=20,
                               warm_s=0.01)
            except Exception as e:  # noqa: BLE001 - a config that does not compile or fit is skipped
                print(f"skip {fmt} {name}: {str(e).splitlines()[0][:100] if str(e) else type(e).__name__}")
                continue
            rows_out.append((ms, err, f"{kv_bytes / ms / 1e6:5.0f} GB/s  {name}", tiles, splits))
        rows_out.sort(key=lambda r: r[0])
        results[fmt] = rows_out
        del args
        torch.cuda.empty_cache()

    out_dir = os.environ.get("OUT", "bench_results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tune_paged_attention.json"), "w") as f:
        json.dump({fmt: [{"ms": r[0], "err": r[1], "config": r[2]} for r in rows]
                   for fmt, rows in results.items()}, f, indent=1)
    # best tiles per format, for `LLMC_PA_BEST=<this file> benchmarks/gpu_attention.py`
    with open(os.path.join(out_dir, "best_tiles.json"), "w") as f:
        json.dump({fmt: {"phase": opts.phase, "tiles": rows[0][3], "num_splits": rows[0][4]}
                   for fmt, rows in results.items() if rows}, f, indent=1)
    for fmt, rows_out in results.items():
        print(f"\n{opts.phase} {fmt}: best of {len(rows_out)} configs ({torch.cuda.get_device_name(0)})")
        for ms, err, name, _, _ in rows_out[:opts.top]:
            print(f"{ms:8.3f} ms  err {err:.1e}  {name}")


if __name__ == "__main__":
    main()
