"""Paged attention on one GPU: llmc's Triton kernels vs torch SDPA and compiled FlexAttention, same run.

Decode: batch 64, context 4096, 32 q heads / 8 kv heads, head_dim 128, block 16, KV in bf16, fp8
and nvfp4 (llmc) vs SDPA and FlexAttention over a contiguous bf16 cache. Reported as KV bytes read
per second (each format's own bytes) and time. Prefill: 4 x 4096 causal tokens, 32 heads, d=128,
llmc's unified kernel over a paged pool vs SDPA's FlashAttention-2 and cuDNN backends (TFLOP/s
counting the causal half). Random data, CUDA events, median of repeats. Times are device times of
back-to-back calls (bench(queued=True): what a CUDA-graph replay of a decode step sees, and what
triton.testing.do_bench measures); the decode rows also give "synced" times, with a host sync after every
call, which add each call's host overhead (Python checks and launches: ~0.1 ms for llmc's Triton launch,
~0.09 ms for compiled FlexAttention, ~0.02 ms for SDPA). Prints a table, writes JSON to
$OUT/gpu_attention.json (or ./bench_results/).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels_gpu import kv_formats
from kernels_gpu.paged_attention import paged_attention, ref_paged_attention


def bench(fn, warm=5, rep=30, warm_s=0.2, queued=True):
    """Median ms of rep timed calls, after at least `warm` calls and warm_s seconds of calls (GPU clocks up).

    queued=True (default): the timed calls are enqueued back to back (events around each, one sync at the
    end), so the GPU never waits on the host and each time is the device time of one call, as in a CUDA
    graph replay or a steady decode loop (triton.testing.do_bench times the same way). queued=False syncs
    after every call, so host-side launch overhead (Python argument checks, launches) lands in the time.
    """
    t0 = time.perf_counter()
    n = 0
    while n < warm or time.perf_counter() - t0 < warm_s:
        fn()
        n += 1
        if n % 8 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    events = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
        if not queued:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]  # ms


def paged_case(num_seqs, ctx, q_len, hq, hkv, d, block_size, kv_format, gen):
    """Random paged pools holding each sequence's context in shuffled blocks, plus contiguous copies."""
    blocks_per_seq = ctx // block_size
    num_blocks = num_seqs * blocks_per_seq + 1
    k = torch.randn(num_seqs, ctx, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(num_seqs, ctx, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    perm = torch.randperm(num_blocks - 1, device="cuda", generator=gen) + 1
    tables = perm[: num_seqs * blocks_per_seq].view(num_seqs, blocks_per_seq).to(torch.int32)
    extra = {}

    def pool_of(x):
        pool = torch.zeros(num_blocks, block_size, hkv, d, device="cuda", dtype=torch.bfloat16)
        pool[tables.flatten().long()] = x.reshape(num_seqs * blocks_per_seq, block_size, hkv, d)
        return pool

    k_pool, v_pool = pool_of(k), pool_of(v)
    if kv_format == "fp8":
        k_scale = k_pool.float().abs().amax(dim=(0, 1, 3)) / 448
        v_scale = v_pool.float().abs().amax(dim=(0, 1, 3)) / 448
        k_pool, v_pool = kv_formats.quantize_fp8(k_pool.float(), k_scale), kv_formats.quantize_fp8(v_pool.float(), v_scale)
        extra = dict(k_scale=k_scale, v_scale=v_scale)
    elif kv_format == "nvfp4":
        k_scale, v_scale = kv_formats.nvfp4_global_scale(k_pool.float()), kv_formats.nvfp4_global_scale(v_pool.float())
        k_pool, kbs = kv_formats.quantize_nvfp4(k_pool.float(), k_scale)
        v_pool, vbs = kv_formats.quantize_nvfp4(v_pool.float(), v_scale)
        extra = dict(k_scale=k_scale, v_scale=v_scale, k_block_scale=kbs, v_block_scale=vbs)
    q = torch.randn(num_seqs * q_len, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    query_start = (torch.arange(num_seqs + 1, device="cuda") * q_len).to(torch.int32)
    seq_lens = torch.full((num_seqs,), ctx, device="cuda", dtype=torch.int32)
    kv_bytes = sum(t.numel() * t.element_size() for t in (k_pool, v_pool, *[x for x in extra.values() if x.dim() > 1]))
    kv_bytes = kv_bytes * (num_blocks - 1) // num_blocks
    args = (q, k_pool, v_pool, query_start, seq_lens, tables)
    kw = dict(scale=1 / math.sqrt(d), kv_format=kv_format, max_q_len=q_len, max_seq_len=ctx, **extra)
    return args, kw, (k, v), kv_bytes


def check(args, kw, out):
    """Relative error against the float64 reference on the first two sequences (poisoned output checked)."""
    q, k_pool, v_pool, qs, sl, bt = args
    rows = int(qs[2])
    ref = ref_paged_attention(q[:rows], k_pool, v_pool, qs[:3], sl[:2], bt[:2], **kw)
    return float((out[:rows].double() - ref).norm() / ref.norm())


def main():
    out_dir = Path(os.environ.get("OUT", "bench_results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "decode": {}, "prefill": {}}
    rows = []

    # ---- decode: batch 64, context 4096 -----------------------------------------------------
    b, ctx, hq, hkv, d = 64, 4096, 32, 8, 128
    best = json.loads(Path(os.environ["LLMC_PA_BEST"]).read_text()) if os.environ.get("LLMC_PA_BEST") else {}
    for fmt in ("bf16", "fp8", "nvfp4"):
        args, kw, (k, v), kv_bytes = paged_case(b, ctx, 1, hq, hkv, d, 16, fmt, gen)
        if fmt in best:  # tiles from benchmarks/tune_paged_attention.py instead of the module's tables
            from kernels_gpu import paged_attention as pa

            if "HG" in best[fmt]["tiles"]:  # a grouped-kernel tile (tune_paged_attention.py --kernel grouped)
                pa.GROUPED_DECODE[("cuda", 128, fmt)] = best[fmt]["tiles"]
            else:
                pa.GROUPED_DECODE.pop(("cuda", 128, fmt), None)
                pa.FORMAT_OVERRIDES[("cuda", 128, "decode", fmt)] = best[fmt]["tiles"]
            kw["num_splits"] = best[fmt]["num_splits"]
            res["decode"][f"llmc_{fmt}_tiles"] = best[fmt]
        out = torch.full_like(args[0], float("nan"))
        paged_attention(*args, out=out, **kw)
        err = check(args, kw, out)
        ms = bench(lambda: paged_attention(*args, out=out, **kw))
        synced = bench(lambda: paged_attention(*args, out=out, **kw), queued=False)
        res["decode"][f"llmc_{fmt}"] = {"ms": ms, "GBps": kv_bytes / ms / 1e6, "rel_err": err, "ms_synced": synced}
        rows.append((f"decode b64 ctx4096 llmc {fmt}", ms, f"{kv_bytes / ms / 1e6:.0f} GB/s",
                     f"err {err:.1e}, synced {synced:.3f} ms"))
        if fmt == "bf16":
            bf16_ms = ms
            qc = args[0].view(b, 1, hq, d).transpose(1, 2)  # [B, Hq, 1, D]
            kc, vc = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # [B, Hkv, S, D]
            peer_bytes = 2 * kc.numel() * 2
            bf16_synced = synced
            ms = bench(lambda: F.scaled_dot_product_attention(qc, kc, vc, enable_gqa=True))
            synced = bench(lambda: F.scaled_dot_product_attention(qc, kc, vc, enable_gqa=True), queued=False)
            res["decode"]["sdpa"] = {"ms": ms, "GBps": peer_bytes / ms / 1e6, "ms_synced": synced}
            rows.append(("decode b64 ctx4096 torch SDPA (contiguous)", ms, f"{peer_bytes / ms / 1e6:.0f} GB/s",
                         f"llmc/SDPA speed {ms / bf16_ms:.3f}x (synced {synced:.3f} ms, "
                         f"{synced / bf16_synced:.3f}x)"))
            try:
                from torch.nn.attention.flex_attention import flex_attention

                flex = torch.compile(flex_attention)
                ms = bench(lambda: flex(qc, kc, vc, enable_gqa=True))
                synced = bench(lambda: flex(qc, kc, vc, enable_gqa=True), queued=False)
                res["decode"]["flex"] = {"ms": ms, "GBps": peer_bytes / ms / 1e6, "ms_synced": synced}
                rows.append(("decode b64 ctx4096 FlexAttention (compiled)", ms, f"{peer_bytes / ms / 1e6:.0f} GB/s",
                             f"llmc/Flex speed {ms / bf16_ms:.3f}x (synced {synced:.3f} ms, "
                             f"{synced / bf16_synced:.3f}x)"))
            except Exception as e:  # noqa: BLE001 - a peer failing must not lose the rest
                res["decode"]["flex_error"] = repr(e)[:300]
            del kc, vc
        else:
            rows.append((f"  {fmt} vs llmc bf16", ms, "", f"speed {bf16_ms / ms:.2f}x (synced "
                                                          f"{bf16_synced / synced:.2f}x)"))
        del args, k, v
        torch.cuda.empty_cache()

    # ---- prefill: 4 x 4096 causal ---------------------------------------------------------------
    nseq, s, h = 4, 4096, 32
    flops = 4 * nseq * h * s * s * d / 2
    args, kw, (k, v), _ = paged_case(nseq, s, s, h, h, d, 16, "bf16", gen)
    out = torch.full_like(args[0], float("nan"))
    paged_attention(*args, out=out, **kw)
    qc = args[0].view(nseq, s, h, d).transpose(1, 2)
    kc, vc = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    ref = F.scaled_dot_product_attention(qc.float(), kc.float(), vc.float(), is_causal=True)
    err = float((out.view(nseq, s, h, d).transpose(1, 2).float() - ref).norm() / ref.norm())
    ms = bench(lambda: paged_attention(*args, out=out, **kw))
    res["prefill"]["llmc"] = {"ms": ms, "TFLOPs": flops / ms / 1e9, "rel_err_vs_fp32_sdpa": err}
    rows.append(("prefill 4x4096 causal llmc (paged)", ms, f"{flops / ms / 1e9:.0f} TFLOP/s", f"err {err:.1e}"))
    llmc_ms = ms
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                ms = bench(lambda: F.scaled_dot_product_attention(qc, kc, vc, is_causal=True))
            res["prefill"][f"sdpa_{name}"] = {"ms": ms, "TFLOPs": flops / ms / 1e9}
            rows.append((f"prefill 4x4096 causal SDPA {name}", ms, f"{flops / ms / 1e9:.0f} TFLOP/s",
                         f"llmc/{name} speed {ms / llmc_ms:.2f}x"))
        except Exception as e:  # noqa: BLE001
            res["prefill"][f"sdpa_{name}_error"] = repr(e)[:300]

    (out_dir / "gpu_attention.json").write_text(json.dumps(res, indent=1))
    print(f"\n{res['device']}, torch {res['torch']}")
    print("times: device time of back-to-back calls; 'synced': a host sync after every call (host overhead in)")
    print(f"{'case':<46} {'ms':>8} {'rate':>14}  note")
    for name, ms, rate, note in rows:
        print(f"{name:<46} {ms:8.3f} {rate:>14}  {note}")


if __name__ == "__main__":
    main()
