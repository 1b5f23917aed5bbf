"""GPU memory the piecewise CUDA graphs of ragged steps hold, bucket by bucket, with and without handing the memory
of captured values that only eager entries read (each layer's q / k / v) back to the graph pool
(lowering.backends.cuda_piecewise.SHARE_EAGER_READS).

Model: the Llama-3.2-1B-shaped checkpoint of benchmarks/gpu_decode.py (random bf16 weights). One CUDA program per
setting; one-sequence prefill steps of growing size (each a new token-row bucket: a capture, then a replay). After
each, the growth of torch's allocated and reserved memory over the program's start. Every replay's logits are
compared with an eager program's (CUDA graphs off) for the smaller steps.

Prints a table last; writes JSON to $OUT/gpu_piecewise_memory.json (or ./bench_results/).
    PYTHONPATH=. python3 benchmarks/gpu_piecewise_memory.py [--sizes 16 100 ... 8192]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=int, default=[16, 100, 300, 700, 1500, 3000, 6000, 8192])
    ap.add_argument("--checked", type=int, default=5, help="compare the first N sizes with the eager program")
    args = ap.parse_args()

    from benchmarks.gpu_decode import make_checkpoint
    from benchmarks.gpu_w8a8_prefill import prefill_input
    from lowering import compile_model
    from lowering.backends import cuda_piecewise as pw

    tmp = Path(tempfile.mkdtemp(prefix="llmc_pwmem_"))
    hf, _ = make_checkpoint(tmp / "ckpt", None)
    del hf
    torch.cuda.empty_cache()
    max_len = max(args.sizes)
    cm = compile_model(str(tmp / "ckpt"), target="cuda", progress=False, max_model_len=max_len)
    blocks = -(-max_len // 16) + 16
    eager = cm.make_program(num_blocks=blocks, max_num_seqs=8, max_model_len=max_len, cuda_graphs=False)
    ref = {n: eager.step(prefill_input(eager, 1, n)) for n in args.sizes[:args.checked]}
    del eager
    torch.cuda.empty_cache()
    rows = []
    for share in (True, False):
        pw.SHARE_EAGER_READS = share
        prog = cm.make_program(num_blocks=blocks, max_num_seqs=8, max_model_len=max_len)
        torch.cuda.synchronize()
        alloc0, res0 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        for n in args.sizes:
            inp = prefill_input(prog, 1, n)
            prog.step(inp)  # the capture
            out = prog.step(inp)  # a replay
            torch.cuda.synchronize()
            err = None
            if n in ref:
                err = float(np.abs(out - ref[n]).max() / np.abs(ref[n]).max())
            rows.append({"share": share, "tokens": n, "allocated_mib": (torch.cuda.memory_allocated() - alloc0) / 2**20,
                         "reserved_mib": (torch.cuda.memory_reserved() - res0) / 2**20, "max_rel_err_vs_eager": err,
                         "piecewise_steps": prog.num_piecewise_steps})
            print(rows[-1], flush=True)
        del prog
        torch.cuda.empty_cache()
    pw.SHARE_EAGER_READS = True
    res = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "rows": rows}
    out_dir = Path(os.environ.get("OUT") or "bench_results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_piecewise_memory.json").write_text(json.dumps(res, indent=2))
    print(f"\n{res['device']}, torch {res['torch']}")
    print("| step tokens | shared: allocated / reserved MiB | not shared: allocated / reserved MiB | logits vs eager |")
    print("| ---: | ---: | ---: | ---: |")
    by = {(r["share"], r["tokens"]): r for r in rows}
    for n in args.sizes:
        a, b = by[(True, n)], by[(False, n)]
        err = "" if a["max_rel_err_vs_eager"] is None else f"{a['max_rel_err_vs_eager']:.1e} / {b['max_rel_err_vs_eager']:.1e}"
        print(f"| {n} | {a['allocated_mib']:.0f} / {a['reserved_mib']:.0f} | {b['allocated_mib']:.0f} / "
              f"{b['reserved_mib']:.0f} | {err} |")


if __name__ == "__main__":
    main()
