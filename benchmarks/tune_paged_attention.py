"""Sweep paged-attention tile sizes on the GPU for one case; prints the best configs (a tuning aid).

Run on the device: PYTHONPATH=. python3 benchmarks/tune_paged_attention.py [--phase decode|prefill]
Results feed the TILE_SIZES table at the top of kernels_gpu/paged_attention.py.
"""
from __future__ import annotations

import argparse
import itertools
import math

import torch

from benchmarks.gpu_attention import bench, check, paged_case
from kernels_gpu import paged_attention as pa


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--phase", default="decode", choices=["decode", "prefill"])
    parser.add_argument("--kv-format", default="bf16")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.phase == "decode":
        case = paged_case(64, 4096, 1, 32, 8, 128, 16, args.kv_format, gen)
        grid = itertools.product([16], [64, 128, 256], [4, 8], [1, 2, 3], [None, 2])
    else:
        case = paged_case(4, 4096, 4096, 32, 32, 128, 16, args.kv_format, gen)
        grid = itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3, 4], [1])
    (q, *rest), kw, _, kv_bytes = case
    key = ("cuda", 128, args.phase)
    original = dict(pa.TILE_SIZES[key])
    results = []
    for block_m, block_n, warps, stages, splits in grid:
        pa.TILE_SIZES[key] = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
        out = torch.full_like(q, float("nan"))
        try:
            pa.paged_attention(q, *rest, out=out, num_splits=splits, **kw)
            err = check((q, *rest), kw, out)
            if not math.isfinite(err) or err > 1e-2:
                raise RuntimeError(f"wrong result, rel err {err}")
            ms = bench(lambda: pa.paged_attention(q, *rest, out=out, num_splits=splits, **kw), warm=3, rep=15)
        except Exception as e:  # noqa: BLE001 - a config that does not compile or fit is skipped
            print(f"skip M{block_m} N{block_n} w{warps} s{stages} splits={splits}: {str(e)[:80]}")
            continue
        results.append((ms, block_m, block_n, warps, stages, splits))
    pa.TILE_SIZES[key] = original
    results.sort()
    print(f"\n{args.phase} {args.kv_format}: best of {len(results)} configs")
    for ms, block_m, block_n, warps, stages, splits in results[:10]:
        rate = f"{kv_bytes / ms / 1e6:.0f} GB/s" if args.phase == "decode" else ""
        print(f"{ms:8.3f} ms {rate:>10}  BLOCK_M={block_m} BLOCK_N={block_n} warps={warps} stages={stages} splits={splits}")


if __name__ == "__main__":
    main()
