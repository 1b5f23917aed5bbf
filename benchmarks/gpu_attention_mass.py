"""What H2O's attention mass costs on one GPU: the attention_mass Triton kernel beside the paged-attention decode
kernel it follows, same pools, same run.

Decode steps (one new token per sequence, bf16 / fp8 KV, block 16) at SmolLM2-135M's head shape (9 q / 3 kv
heads, d=64) and a Llama-3-8B layer's (32 / 8, d=128), batch 32 and 64, context 1024 and 4096: device time of
paged_attention alone, of attention_mass alone, and their ratio (the step's attention time grows by it when H2O
is on; with no policy the op is not in the graph at all). The mass kernel reads K twice (max/sum, then the
probabilities) and no V, and adds into the mass pool with atomics. Random data, queued CUDA events (a CUDA
graph replay's view), median of repeats; checked against the op's float64 statement on two sequences.
Prints a table and writes JSON to $OUT/gpu_attention_mass.json (or ./bench_results/).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_attention import bench, paged_case  # noqa: E402
from kernels_gpu.attention_mass import attention_mass  # noqa: E402
from kernels_gpu.paged_attention import paged_attention  # noqa: E402


def mass_reference(q, k_pool, seq_lens, tables, scale, k_scale=None, rows=2):
    """f64 [rows, ctx, Hkv]: each of the first `rows` decode rows' softmax summed over each kv head's q heads."""
    hq, hkv = q.shape[1], k_pool.shape[2]
    g = hq // hkv
    out = []
    for s in range(rows):
        n = int(seq_lens[s])
        blocks = tables[s, : -(-n // k_pool.shape[1])].long()
        k = k_pool[blocks].reshape(-1, hkv, k_pool.shape[-1])[:n].double()
        if k_scale is not None:
            k = k * k_scale.double()[None, :, None]
        sc = torch.einsum("hd,chd->hc", q[s].double(), k.repeat_interleave(g, dim=1)) * scale
        out.append(torch.softmax(sc, dim=-1).view(hkv, g, n).sum(1).T)
    return out


def main():
    out_dir = Path(os.environ.get("OUT", "bench_results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "rows": []}
    print(f"{'shape':<14s} {'fmt':<5s} {'batch':>5s} {'ctx':>5s} {'attn ms':>8s} {'mass ms':>8s} {'mass/attn':>9s} "
          f"{'max err':>8s}")
    for name, hq, hkv, d in (("smollm2", 9, 3, 64), ("llama3-8b", 32, 8, 128)):
        for fmt in ("bf16", "fp8"):
            for b, ctx in ((32, 1024), (64, 4096)):
                args, kw, _, _ = paged_case(b, ctx, 1, hq, hkv, d, 16, fmt, gen)
                q, k_pool, v_pool, qs, sl, bt = args
                out = torch.empty_like(q)
                mass = torch.zeros(k_pool.shape[0], k_pool.shape[1], hkv, device="cuda", dtype=torch.float32)
                # decode rows write their own (last) slot: the slot the kernel zeroes first
                last = sl.long() - 1
                slots = (bt.gather(1, (last // 16)[:, None]).squeeze(1).long() * 16 + last % 16).to(torch.int32)
                mkw = dict(scale=kw["scale"], kv_format=fmt, max_q_len=1, max_seq_len=ctx,
                           **({"k_scale": kw["k_scale"]} if fmt == "fp8" else {}))
                attention_mass(q, k_pool, qs, sl, bt, slots, mass, **mkw)
                ref = mass_reference(q, k_pool, sl, bt, kw["scale"], kw.get("k_scale"))
                err = 0.0
                for s, r in enumerate(ref):
                    blocks = bt[s, : -(-ctx // 16)].long()
                    got = mass[blocks].reshape(-1, hkv)[:ctx].double()
                    err = max(err, float((got - r).abs().max()))
                t_attn = bench(lambda: paged_attention(*args, out=out, **kw))
                t_mass = bench(lambda: attention_mass(q, k_pool, qs, sl, bt, slots, mass, **mkw))
                row = {"shape": name, "kv_format": fmt, "batch": b, "context": ctx, "attention_ms": t_attn,
                       "mass_ms": t_mass, "ratio": t_mass / t_attn, "max_abs_err": err}
                res["rows"].append(row)
                print(f"{name:<14s} {fmt:<5s} {b:5d} {ctx:5d} {t_attn:8.4f} {t_mass:8.4f} {t_mass / t_attn:9.2f} "
                      f"{err:8.1e}", flush=True)
    (out_dir / "gpu_attention_mass.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
