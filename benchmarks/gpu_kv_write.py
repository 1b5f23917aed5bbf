"""KV-cache writes on one GPU: llmc's kv_write per format vs a torch scatter, same run.

For a SmolLM2-135M-shaped layer (3 kv heads x 64) and a Llama-3-8B-shaped one (8 x 128), at 1, 16, 64, 512 and
4096 new tokens (decode batches to a prefill chunk) scattered to shuffled slots of a paged pool:
  torch      k_cache.view(-1, H, D)[slots] = k (and v): the peer for a bf16 write (vLLM's reshape_and_cache role)
  bf16 / fp8 llmc's kv_write (fp8: per-head scales)
  nvfp4      K centered, "mse46" block scales, nearest rounding (kv_rounding="nearest")
  nvfp4 score  the same with score-aware K rounding (k_feedback; kv_rounding="score", the default)
Each case is a CUDA graph of 10 calls, median of 25 replays, per call (benchmarks/gpu_linear.py's bench_graph).
The nvfp4 score bytes are compared with lowering.quant.formats.quantize_nvfp4_feedback (share of equal code bytes
and block scales: the GPU may contract a multiply-add where numpy rounds twice). Prints a table last; writes JSON
to $OUT/gpu_kv_write.json (or ./bench_results/).
    PYTHONPATH=. python3 benchmarks/gpu_kv_write.py [--tokens 1 16 64 512 4096]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from benchmarks.gpu_linear import bench_graph
from kernels_gpu.kv_write import kv_write
from lowering.quant import formats

SHAPES = {"smollm2": (3, 64), "8b": (8, 128)}
BLOCK = 16


def case(hkv, d, t, gen):
    num_blocks = max(64, 2 * (t // BLOCK + 1))
    slots = torch.randperm(num_blocks * BLOCK, generator=gen)[:t].to(torch.int32).cuda()
    k = torch.randn(t, hkv, d, generator=gen).cuda().to(torch.bfloat16)
    v = torch.randn(t, hkv, d, generator=gen).cuda().to(torch.bfloat16)
    a = torch.randn(hkv, 512, d, generator=gen, dtype=torch.float64) * torch.logspace(0.6, -1, d, dtype=torch.float64)
    a = a @ torch.from_numpy(formats.hadamard(d))
    h = torch.einsum("hnd,hne->hde", a, a) / 512
    factor = torch.from_numpy(formats.feedback_factor(h.numpy())).cuda()
    center = (0.1 * torch.randn(hkv, d, generator=gen)).cuda()
    return num_blocks, slots, k, v, factor, center


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 512, 4096])
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (hkv, d) in SHAPES.items():
        for t in args.tokens:
            n, slots, k, v, factor, center = case(hkv, d, t, gen)
            plain = [torch.zeros(n, BLOCK, hkv, d, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
            f8 = [torch.zeros(n, BLOCK, hkv, d, dtype=torch.float8_e4m3fn, device="cuda") for _ in range(2)]
            nv = [torch.zeros(n, BLOCK, hkv, d // 2, dtype=torch.uint8, device="cuda") for _ in range(2)]
            nvs = [torch.zeros(n, BLOCK, hkv, d // 16, dtype=torch.float8_e4m3fn, device="cuda") for _ in range(2)]
            scale = torch.full((hkv,), 4.0 / 448, device="cuda")
            gs = torch.tensor(5.0 / 2688, device="cuda")
            long_slots = slots.long()

            def torch_write():
                plain[0].view(-1, hkv, d)[long_slots] = k
                plain[1].view(-1, hkv, d)[long_slots] = v

            nvkw = dict(kv_format="nvfp4", k_scale=gs, v_scale=gs, k_block_scale=nvs[0], v_block_scale=nvs[1],
                        check_slots=False, k_center=center, scale_rule="mse46")
            fns = {
                "torch": torch_write,
                "bf16": lambda: kv_write(k, v, slots, *plain, check_slots=False),
                "fp8": lambda: kv_write(k, v, slots, *f8, kv_format="fp8", k_scale=scale, v_scale=scale,
                                        check_slots=False),
                "nvfp4": lambda: kv_write(k, v, slots, *nv, **nvkw),
                "nvfp4 score": lambda: kv_write(k, v, slots, *nv, **nvkw, k_feedback=factor),
            }
            row = {"shape": name, "tokens": t}
            for label, fn in fns.items():
                row[label] = bench_graph([fn] * 10) * 1e3  # us
            fns["nvfp4 score"]()
            torch.cuda.synchronize()
            flat = slots.long().cpu()
            got_q = nv[0].view(-1, hkv, d // 2)[flat].cpu().numpy()
            got_s = nvs[0].view(-1, hkv, d // 16)[flat].cpu().view(torch.uint8).numpy()
            x = (k.float() - center).cpu().numpy()
            ref = formats.quantize_nvfp4_feedback(x, float(gs), factor.cpu().numpy(), "mse46")
            row["score bytes equal"] = float((got_q == ref["q"]).mean())
            row["score scales equal"] = float((got_s == ref["block_scale"].view(np.uint8)).mean())
            rows.append(row)
            print(row, flush=True)
    out_dir = Path(os.environ.get("OUT", "bench_results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    (out_dir / "gpu_kv_write.json").write_text(json.dumps(res, indent=1))
    print(f"\n{'shape':8} {'tokens':>6} | {'torch':>7} {'bf16':>7} {'fp8':>7} {'nvfp4':>7} {'score':>7} us"
          f" | score/nvfp4 | bytes equal")
    for r in rows:
        print(f"{r['shape']:8} {r['tokens']:6d} | {r['torch']:7.2f} {r['bf16']:7.2f} {r['fp8']:7.2f} {r['nvfp4']:7.2f} "
              f"{r['nvfp4 score']:7.2f} | {r['nvfp4 score'] / r['nvfp4']:10.2f}x | {r['score bytes equal']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
