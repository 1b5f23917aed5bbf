"""Causal prefill attention on one GPU: llmc's prefill_attention vs torch SDPA backends and llmc's paged kernel.

Cases (bf16, head_dim 128, every sequence starting at position 0): 4 x 4096 tokens with 32 q / 32 kv heads
and 32 q / 8 kv heads (GQA), and a ragged batch (4096, 3000, 1024, 77 tokens, 32/8 heads). Peers: SDPA's
FlashAttention-2, cuDNN and memory-efficient backends over the same [B, H, S, D] views (the ragged batch
runs SDPA once per sequence), and llmc's unified paged kernel over a block-16 pool holding the same K/V.
Every output is checked against the float64 reference in the same run. TFLOP/s count the causal half
(4 * sum(L^2) / 2 * D * Hq). CUDA events, warm-up, then every peer of a case timed in interleaved rounds
(median of the round medians) of back-to-back calls (device time; see benchmarks.gpu_attention.bench), and
llmc and SDPA flash once more with a host sync after every call ("synced": host overhead in). --sweep also times tile variants of llmc's kernel against its default,
interleaved (d=128; within --sweep-budget seconds). Prints a table last; writes JSON to $OUT/gpu_prefill.json
(or ./bench_results/).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gpu_attention import bench
from kernels_gpu import prefill_attention as pf
from kernels_gpu.paged_attention import paged_attention


def bench_rounds(fns: dict, rounds=5, rep=10):
    """Time several functions interleaved (A B C A B C ...) so clock drift hits all alike.

    Returns label -> (median of the per-round medians in ms, [min, max] of the round medians)."""
    for fn in fns.values():
        bench(fn, warm=3, rep=1, warm_s=0.2)
    per_round = {label: [] for label in fns}
    for _ in range(rounds):
        for label, fn in fns.items():
            per_round[label].append(bench(fn, warm=2, rep=rep, warm_s=0.0))
    out = {}
    for label, ms in per_round.items():
        ms.sort()
        out[label] = (ms[len(ms) // 2], [ms[0], ms[-1]])
    return out


def make_case(lengths, hq, hkv, d, gen):
    t = sum(lengths)
    q = torch.randn(t, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    flops = sum(4 * n * n * d * hq / 2 for n in lengths)
    return q, k, v, cu, flops


def rel_err(got, ref):
    return float((got.double() - ref).norm() / ref.norm())


def paged_pool(k, v, lengths, block_size=16):
    """The same K/V in a paged pool (sequences in consecutive blocks) + block tables and seq_lens."""
    pages = [math.ceil(n / block_size) for n in lengths]
    hkv, d = k.shape[1:]
    k_pool = torch.zeros(sum(pages) + 1, block_size, hkv, d, device="cuda", dtype=k.dtype)
    v_pool = torch.zeros_like(k_pool)
    tables = torch.zeros(len(lengths), max(pages), device="cuda", dtype=torch.int32)
    blk, row = 1, 0
    for s, (n, p) in enumerate(zip(lengths, pages)):
        tables[s, :p] = torch.arange(blk, blk + p, device="cuda", dtype=torch.int32)
        k_pool.view(-1, hkv, d)[blk * block_size:blk * block_size + n] = k[row:row + n]
        v_pool.view(-1, hkv, d)[blk * block_size:blk * block_size + n] = v[row:row + n]
        blk, row = blk + p, row + n
    seq_lens = torch.tensor(lengths, device="cuda", dtype=torch.int32)
    return k_pool, v_pool, tables, seq_lens


SWEEP = [  # overrides of the d=128 TILE_SIZES entry, most promising first
    {"WARP_SPEC": True},
    {"ONE_LOOP": True},
    {"DIAG_STAGES": 1},
    {"USE_TMA": 1},
    {"USE_TMA": 0},
    {"ORDER": 0},
    {"LAZY_RESCALE": True},
    {"BLOCK_N": 32, "num_stages": 4, "ONE_LOOP": True},
    {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3, "maxnreg": None},
    {"BLOCK_N": 128, "num_stages": 3, "maxnreg": None, "USE_TMA": 1},  # the 2026-11-26 default
    {"BLOCK_M": 256, "BLOCK_N": 64, "num_stages": 3, "maxnreg": None},
]


def sweep(q, k, v, cu, max_seqlen, flops, ref, budget_s, variants=SWEEP):
    """Time each variant against the default config, interleaved (speed = default ms / variant ms)."""
    base = pf._tile_sizes(q.device, q.shape[-1], q.dtype)
    results = []
    t_end = time.time() + budget_s
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5

    def call(cfg):
        return lambda: pf.prefill_attention(q, k, v, cu, scale=scale, max_seqlen=max_seqlen, out=out, tiles=cfg)

    for variant in variants:
        if time.time() > t_end:
            break
        cfg = {**base, **variant}
        try:
            out.fill_(float("nan"))
            call(cfg)()
            err = rel_err(out, ref)
            times = bench_rounds({"default": call(base), "variant": call(cfg)}, rounds=3, rep=10)
            ms, base_ms = times["variant"][0], times["default"][0]
            results.append({"override": variant, **cfg, "ms": ms, "TFLOPs": flops / ms / 1e9, "rel_err": err,
                            "default_ms": base_ms, "speed_vs_default": base_ms / ms})
            print(f"sweep {variant}: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s err {err:.1e}, "
                  f"{base_ms / ms:.3f}x default ({base_ms:.3f} ms)", flush=True)
        except Exception as e:  # noqa: BLE001 - a variant that fails to compile must not stop the sweep
            results.append({"override": variant, **cfg, "error": repr(e)[:200]})
            print(f"sweep {variant}: FAILED {repr(e)[:200]}", flush=True)
    return results


def run_case(name, lengths, hq, hkv, d, gen, rows, res):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, cu, flops = make_case(lengths, hq, hkv, d, gen)
    scale = d ** -0.5
    max_seqlen = max(lengths)
    ref = pf.ref_prefill_attention(q, k, v, cu, scale=scale)
    entry = res["cases"][name] = {"lengths": lengths, "hq": hq, "hkv": hkv, "d": d, "flops": flops,
                                  "tiles": pf._tile_sizes(q.device, d, q.dtype)}

    timed = {}  # label -> (fn, rel_err, note); timed together below, interleaved

    out = torch.full_like(q, float("nan"))
    pf.prefill_attention(q, k, v, cu, scale=scale, max_seqlen=max_seqlen, out=out)
    timed["llmc"] = (lambda: pf.prefill_attention(q, k, v, cu, scale=scale, max_seqlen=max_seqlen, out=out),
                     rel_err(out, ref), "")

    # the same kernel reading q/k/v as strided slices of one fused projection output
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    fq = qkv[:, :hq * d].view(-1, hq, d)
    fk = qkv[:, hq * d:(hq + hkv) * d].view(-1, hkv, d)
    fv = qkv[:, (hq + hkv) * d:].view(-1, hkv, d)
    out2 = torch.full_like(q, float("nan"))
    pf.prefill_attention(fq, fk, fv, cu, scale=scale, max_seqlen=max_seqlen, out=out2)
    timed["llmc_fused_qkv_views"] = (
        lambda: pf.prefill_attention(fq, fk, fv, cu, scale=scale, max_seqlen=max_seqlen, out=out2),
        rel_err(out2, ref), "")

    k_pool, v_pool, tables, seq_lens = paged_pool(k, v, lengths)
    pkw = dict(scale=scale, max_q_len=max_seqlen, max_seq_len=max_seqlen)
    out3 = torch.full_like(q, float("nan"))
    paged_attention(q, k_pool, v_pool, cu, seq_lens, tables, out=out3, **pkw)
    timed["llmc_paged"] = (lambda: paged_attention(q, k_pool, v_pool, cu, seq_lens, tables, out=out3, **pkw),
                           rel_err(out3, ref), "")

    bounds = cu.tolist()
    uniform = len(set(lengths)) == 1
    if uniform:
        b, s = len(lengths), lengths[0]
        views = [(q.view(b, s, hq, d).transpose(1, 2), k.view(b, s, hkv, d).transpose(1, 2),
                  v.view(b, s, hkv, d).transpose(1, 2))]
    else:  # SDPA has no varlen entry point here: one call per sequence
        views = [(q[t0:t1].transpose(0, 1)[None], k[t0:t1].transpose(0, 1)[None], v[t0:t1].transpose(0, 1)[None])
                 for t0, t1 in zip(bounds[:-1], bounds[1:])]
    expanded = [(qq, kk.repeat_interleave(hq // hkv, 1), vv.repeat_interleave(hq // hkv, 1)) for qq, kk, vv in views]

    def sdpa_out(outs):
        return torch.cat([o[0].transpose(0, 1) if not uniform else o.transpose(1, 2).reshape(-1, hq, d)
                          for o in outs], dim=0)

    def sdpa_fn(backend, inputs, gqa):
        def fn():
            with sdpa_kernel(backend):
                return [F.scaled_dot_product_attention(a, b_, c, is_causal=True, enable_gqa=gqa) for a, b_, c in inputs]
        return fn

    for label, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                           ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        note = "" if uniform else f"{len(lengths)} calls"
        try:
            try:
                fn = sdpa_fn(backend, views, hq != hkv)
                outs = fn()
            except RuntimeError:  # backend without GQA support: expanded K/V (made outside the timing)
                fn = sdpa_fn(backend, expanded, False)
                outs = fn()
                note = (note + ", " if note else "") + "expanded kv"
            timed[label] = (fn, rel_err(sdpa_out(outs), ref), note)
            del outs
        except Exception as e:  # noqa: BLE001 - a peer failing must not lose the rest
            entry[label + "_error"] = repr(e)[:300]

    times = bench_rounds({label: fn for label, (fn, _, _) in timed.items()})
    for label, (_, err, note) in timed.items():
        ms, spread = times[label]
        entry[label] = {"ms": ms, "TFLOPs": flops / ms / 1e9, "rel_err": err, "round_ms_range": spread,
                        **({"note": note} if note else {})}
    for label in ("llmc", "sdpa_flash"):
        if label in timed:
            entry[label]["ms_synced"] = bench(timed[label][0], warm=2, rep=20, warm_s=0.0, queued=False)
    del views, expanded, k_pool, v_pool, timed

    llmc_ms = entry["llmc"]["ms"]
    for label in ("llmc", "llmc_fused_qkv_views", "llmc_paged", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient"):
        if label in entry:
            e = entry[label]
            note = "" if label == "llmc" else f"llmc speed {e['ms'] / llmc_ms:.3f}x"
            if "ms_synced" in e:
                note = ", ".join(x for x in (note, f"synced {e['ms_synced']:.3f} ms") if x)
                if label != "llmc":
                    note += f" ({e['ms_synced'] / entry['llmc']['ms_synced']:.3f}x)"
            rows.append((f"{name} {label}", e["ms"], e["TFLOPs"], e["rel_err"], ", ".join(
                x for x in (note, e.get("note", "")) if x)))
    return q, k, v, cu, flops, ref


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep", action="store_true", help="time tile variants first (d=128, 4x4096)")
    parser.add_argument("--sweep-budget", type=float, default=100.0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)  # SDPA explains every backend it skips
    out_dir = Path(os.environ.get("OUT", "bench_results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "cases": {}}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        pass
    rows = []
    d = 128
    try:  # a default tile config that fails to compile (e.g. TMA on another Triton) must not lose the run
        x = torch.randn(300, 2, d, device="cuda", dtype=torch.bfloat16)
        cu = torch.tensor([0, 300], device="cuda", dtype=torch.int32)
        pf.prefill_attention(x, x, x, cu, scale=d ** -0.5, max_seqlen=300)
    except Exception as e:  # noqa: BLE001
        res["default_tiles_error"] = repr(e)[:500]
        print(f"default tiles failed, using pointer loads: {e!r}"[:500], flush=True)
        for key in pf.TILE_SIZES:
            pf.TILE_SIZES[key]["USE_TMA"] = False
            pf.TILE_SIZES[key]["WARP_SPEC"] = False
    cases = [("4x4096 h32/32", [4096] * 4, 32, 32), ("4x4096 h32/8", [4096] * 4, 32, 8),
             ("ragged h32/8", [4096, 3000, 1024, 77], 32, 8)]
    for i, (name, lengths, hq, hkv) in enumerate(cases):
        q, k, v, cu, flops, ref = run_case(name, lengths, hq, hkv, d, gen, rows, res)
        if args.sweep and i == 0:
            first = res["cases"][name]["sweep"] = sweep(q, k, v, cu, max(lengths), flops, ref, args.sweep_budget)
            best = sorted((r for r in first if "ms" in r), key=lambda r: -r["speed_vs_default"])[:4]
        elif args.sweep and i == 1:  # GQA: the default and the best few of the first sweep
            res["cases"][name]["sweep"] = sweep(q, k, v, cu, max(lengths), flops, ref, args.sweep_budget / 3,
                                                [r["override"] for r in best])
        del q, k, v, cu, ref
        torch.cuda.empty_cache()

    (out_dir / "gpu_prefill.json").write_text(json.dumps(res, indent=1))
    print(f"\n{res['device']}, torch {res['torch']}, triton {res.get('triton')}, {res['date']}")
    for name, entry in res["cases"].items():
        errs = {k[:-6]: v for k, v in entry.items() if k.endswith("_error")}
        for label, e in errs.items():
            print(f"{name} {label}: FAILED {e}")
    for name, entry in res["cases"].items():
        flash = entry.get("sdpa_flash", {}).get("ms")
        for r in sorted((r for r in entry.get("sweep", []) if "ms" in r), key=lambda r: -r["speed_vs_default"])[:5]:
            vs = f", ~{flash / r['ms']:.2f}x SDPA flash (not interleaved)" if flash else ""
            print(f"sweep {name} {r['override']}: {r['ms']:.3f} ms {r['TFLOPs']:.0f} TFLOP/s, "
                  f"{r['speed_vs_default']:.3f}x default{vs}")
    print(f"{'case':<36} {'ms':>8} {'TFLOP/s':>8} {'rel_err':>8}  note")
    for name, ms, tflops, err, note in rows:
        print(f"{name:<36} {ms:8.3f} {tflops:8.0f} {err:8.1e}  {note}")


if __name__ == "__main__":
    main()
