"""Roofline model of the Pallas TPU kernels on TPU v5e, v6e and v7 (Ironwood), and the block-size chooser.

No TPU is reachable from this project, so every number printed here is a PREDICTION of a model, never a
measurement. The model (docs/tpu-roofline.md explains it at length):

  * per-device figures (HBM bandwidth and capacity, VMEM, MXU rates) come from public Google documents, each
    cited in `SOURCES`; on TPU7x one JAX device is one TensorCore (half a chip), so its chip figures are halved;
  * a kernel is a software pipeline of `steps` grid steps; step i+1's DMAs run while step i computes, so in
    steady state a step costs max(HBM time of its bytes, compute time + per-step overhead), where compute is
    max(MXU time, VPU time, scalar-core DMA-issue time). The first block's DMA and the last step's compute are
    exposed, and every kernel pays a fixed launch cost (`OVERHEAD`, every constant an assumption with its reason);
  * MXU time pads the streamed operand's rows up to the array width (a weight tile costs at least `mxu_dim`
    cycles to load), so a matrix-vector product is charged the weight-load rate, not its FLOPs;
  * VMEM is counted with Mosaic's tiling: last dim padded to 128 lanes, second-to-last to 8 sublanes x packing
    (16 rows for 16-bit, 32 for 8-bit types), and the pipeline double-buffers every blocked operand.

The chooser enumerates tiling-legal block shapes per kernel and generation and keeps the one whose summed
log-time over a representative workload is smallest while its VMEM (blocks + scratch + temporaries) fits the
generation's default scoped-VMEM budget. The result is kept as data in kernels_pallas/tuning.py.

  python3 benchmarks/tpu_roofline.py              # tables; writes bench_results/tpu_roofline.json
  python3 benchmarks/tpu_roofline.py --check      # exit 1 when kernels_pallas/tuning.py differs from the choice
  python3 benchmarks/tpu_roofline.py --write      # put the chosen per-generation entries into tuning.py
  python3 benchmarks/tpu_roofline.py --doc        # regenerate the tables of docs/tpu-roofline.md
Use the project's environment (.venv): the model imports each kernel's own `vmem_bytes`.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import itertools
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TUNING_PATH = ROOT / "kernels_pallas" / "tuning.py"
GENERATIONS = ("v5e", "v6e", "v7")
MiB = 1024 * 1024

# ----------------------------------------------------------------------------------------------------------
# Published figures. Each key is cited; "derived" values say how they follow from cited ones.
# ----------------------------------------------------------------------------------------------------------
SOURCES = {
    "v5e": "https://cloud.google.com/tpu/docs/v5e",
    "v6e": "https://cloud.google.com/tpu/docs/v6e",
    "v7": "https://cloud.google.com/tpu/docs/tpu7x",
    "v7_perf": "https://cloud.google.com/tpu/docs/ironwood-performance",
    "pallas_hw": "https://docs.jax.dev/en/latest/pallas/tpu/hardware.html",
    "tpu_info": "https://github.com/jax-ml/jax/blob/main/jax/_src/pallas/mosaic/tpu_info.py",
    "compiler_params": "https://docs.jax.dev/en/latest/_autosummary/jax.experimental.pallas.tpu.CompilerParams.html",
    "pallas_matmul": "https://docs.jax.dev/en/latest/pallas/tpu/matmul.html",
    "rpa_paper": "https://arxiv.org/abs/2604.15464",
    "rpa_vmem_pr": "https://github.com/vllm-project/tpu-inference/pull/806",
}


@dataclasses.dataclass(frozen=True)
class Chip:
    """One JAX device of a TPU generation (v5e/v6e: one chip; TPU7x: one of the chip's two TensorCores)."""
    name: str
    device: str
    hbm_bw: float              # bytes/s per device
    hbm_bytes: float           # per device
    vmem_bytes: int            # physical VMEM per TensorCore
    scoped_vmem_default: int   # Mosaic's default scoped-VMEM limit (what a kernel gets without vmem_limit_bytes)
    bf16_flops: float          # MXU peak per device
    int8_ops: float            # 0 = not published / not native
    fp8_flops: float           # 0 = no native e4m3fn MXU path
    mxu_dim: int               # systolic array width (tpu_info.mxu_column_size)
    num_mxus: int              # per TensorCore (tpu_info.num_mxus)
    native_fp8_e4m3fn: bool    # MXU takes float8_e4m3fn operands (tpu_info.is_matmul_supported: gen 7 only)
    cited: dict

    @property
    def clock_hz(self) -> float:
        """Derived: the clock at which num_mxus arrays of mxu_dim^2 MACs reach the bf16 peak."""
        return self.bf16_flops / (2 * self.num_mxus * self.mxu_dim ** 2)

    @property
    def vpu_ops(self) -> float:
        """Derived (assumption VALU_SLOTS): 8 sublanes x 128 lanes x VALU_SLOTS element-ops per cycle."""
        return 8 * 128 * OVERHEAD["valu_slots"]["value"] * self.clock_hz


CHIPS = {
    "v5e": Chip(
        name="v5e", device="TPU v5e chip (1 TensorCore)",
        hbm_bw=819e9, hbm_bytes=16e9, vmem_bytes=128 * MiB, scoped_vmem_default=16 * MiB,
        bf16_flops=197e12, int8_ops=393e12, fp8_flops=0.0, mxu_dim=128, num_mxus=4, native_fp8_e4m3fn=False,
        cited={
            "hbm_bw": ("819 GB/s", SOURCES["v5e"]),
            "hbm_bytes": ("16 GB", SOURCES["v5e"]),
            "bf16_flops": ("197 TFLOP/s", SOURCES["v5e"]),
            "int8_ops": ("393 TOP/s", SOURCES["v5e"]),
            "fp8_flops": ("none published; JAX tpu_info lists fp8 = 0", SOURCES["tpu_info"]),
            "vmem_bytes": ("128 MiB per TensorCore", SOURCES["pallas_hw"] + " (table from " + SOURCES["tpu_info"] + ")"),
            "mxu": ("4 MXUs of 128x128 per TensorCore", SOURCES["v5e"]),
            "scoped_vmem_default": ("16 MiB: NOT in Google's docs; the limit exists (vmem_limit_bytes / "
                                    "--xla_tpu_scoped_vmem_limit_kib, " + SOURCES["compiler_params"] + ") and "
                                    "16 MiB is the value commonly reported for v5e; ASSUMPTION", ""),
        }),
    "v6e": Chip(
        name="v6e", device="TPU v6e (Trillium) chip (1 TensorCore)",
        hbm_bw=1638e9, hbm_bytes=32e9, vmem_bytes=128 * MiB, scoped_vmem_default=32 * MiB,
        bf16_flops=918e12, int8_ops=1836e12, fp8_flops=0.0, mxu_dim=256, num_mxus=2, native_fp8_e4m3fn=False,
        cited={
            "hbm_bw": ("1638 GB/s", SOURCES["v6e"]),
            "hbm_bytes": ("32 GB", SOURCES["v6e"]),
            "bf16_flops": ("918 TFLOP/s", SOURCES["v6e"]),
            "int8_ops": ("1836 TOP/s", SOURCES["v6e"]),
            "fp8_flops": ("TPU7x page lists v6e FP8 = 918 (same as bf16); JAX tpu_info: v6e MXU takes e5m2 / "
                          "e4m3b11fnuz, not e4m3fn, so our e4m3fn data is converted on the VPU", SOURCES["v7"]),
            "vmem_bytes": ("128 MiB per TensorCore", SOURCES["pallas_hw"]),
            "mxu": ("2 MXUs of 256x256 per TensorCore", SOURCES["v6e"]),
            "scoped_vmem_default": ("32 MiB: NOT in Google's docs; compile errors on v6e report 'limit 32.00M "
                                    "exceeded' without a flag; ASSUMPTION", ""),
        }),
    # TPU7x: the chip has 2 TensorCores and JAX exposes each as a device (TPU7x page, "dual-chiplet"); a Pallas
    # kernel runs on one, so the per-device figures are half the chip's.
    "v7": Chip(
        name="v7", device="TPU7x (Ironwood): one TensorCore = one JAX device (half a chip)",
        hbm_bw=7380e9 / 2, hbm_bytes=192 * 1024 ** 3 / 2, vmem_bytes=64 * MiB, scoped_vmem_default=32 * MiB,
        bf16_flops=2307e12 / 2, int8_ops=0.0, fp8_flops=4614e12 / 2, mxu_dim=256, num_mxus=2,
        native_fp8_e4m3fn=True,
        cited={
            "hbm_bw": ("7380 GB/s per chip (halved per TensorCore device)", SOURCES["v7"]),
            "hbm_bytes": ("192 GiB per chip (halved)", SOURCES["v7"]),
            "bf16_flops": ("2307 TFLOP/s per chip (halved)", SOURCES["v7"]),
            "fp8_flops": ("4614 TFLOP/s per chip (halved)", SOURCES["v7"] + " ; " + SOURCES["v7_perf"]),
            "int8_ops": ("not published for TPU7x; JAX tpu_info lists 0", SOURCES["tpu_info"]),
            "vmem_bytes": ("64 MiB per TensorCore", SOURCES["pallas_hw"]),
            "mxu": ("2 MXUs of 256x256 per TensorCore (JAX tpu_info)", SOURCES["tpu_info"]),
            "tensorcores": ("2 TensorCores per chip", SOURCES["v7"]),
            "scoped_vmem_default": ("32 MiB: NOT in Google's docs; ASSUMPTION (half the 64 MiB, the same "
                                    "default as v6e)", ""),
        }),
}

# ----------------------------------------------------------------------------------------------------------
# Overhead model. Google publishes none of these; each is an explicit assumption, chosen once, not fitted.
# ----------------------------------------------------------------------------------------------------------
OVERHEAD = {
    "step_s": {"value": 0.35e-6, "why": "fixed cost of one Pallas grid step (scalar bookkeeping, semaphore "
               "waits, next-step DMA issue): the ~0.35 us figure quoted for Pallas TPU pipelines; ASSUMPTION"},
    "dma_issue_s": {"value": 10e-9, "why": "scalar-core cost to issue one DMA descriptor (~15-20 scalar "
                    "cycles); DMAs issued per page make this the bound for small pages; ASSUMPTION"},
    "dma_latency_s": {"value": 0.5e-6, "why": "HBM->VMEM latency of the first (unhidden) block; ASSUMPTION"},
    "kv_iter_s": {"value": 0.1e-6, "why": "one iteration of a kernel's manual KV loop (SMEM page-index loads, "
                  "semaphore waits, loop control) beyond its DMA issues; ASSUMPTION"},
    "launch_s": {"value": 1.0e-6, "why": "fixed cost per kernel / XLA fusion inside one jitted step; ASSUMPTION"},
    "valu_slots": {"value": 4, "why": "VALU issue slots per bundle, each an 8x128 element op; ASSUMPTION"},
    "vmem_margin": {"value": 0.9, "why": "fraction of the scoped-VMEM limit the chooser fills (the rest for "
                    "Mosaic internal scratch and spills we do not model); ASSUMPTION"},
}
# VALU element-ops per stored element to turn a format into bf16 MXU operands (or back); ASSUMPTIONS.
# quantized_matmul (kernels_pallas/quant_matmul.py): int8/fp8 convert to bf16; int4/nvfp4 widen to i32,
# transpose, mask/shift the nibble, decode (int4: convert, - zero; nvfp4: arithmetic E2M1), * scale, cast.
DEQUANT_OPS = {"bf16": 0, "int8": 1, "fp8": 1, "int4": 7, "nvfp4": 11}
# ragged_paged_attention per stored K/V element: V masking (convert, select, convert) on every format, fp8
# converts, nvfp4 arithmetic E2M1 decode of both nibbles in f32 and the scale multiply.
ATT_DEQUANT_OPS = {"bf16": 1.5, "fp8": 2.5, "nvfp4": 14}
F32_MXU_PASSES = 3       # an f32 x f32 MXU matmul at full precision ~ 3 bf16 passes (nvfp4 attention path)
QUANT_OPS = {"bf16": 0, "fp8": 3, "nvfp4": 12}                          # kv_write: scale, round, pack, amax
SOFTMAX_OPS = 8          # per score: scale, mask compare+select, max, subtract, (exp on the EUP), select, sum
RMSNORM_OPS = 8          # per element: converts, add, square, sum, rsqrt-multiply, weight multiply

KV_ELEM_BYTES = {"bf16": 2.0, "fp8": 1.0, "nvfp4": 0.5 + 1 / 16}      # nvfp4: 4-bit code + e4m3 per 16
W_ELEM_BYTES = {"bf16": 2.0, "int8": 1.0, "fp8": 1.0, "int4": 0.5 + 3 / 128, "nvfp4": 0.5 + 1 / 16}

RPA_ANCHOR = {"value": 0.86, "what": "published RPA decode memory-bandwidth utilization, Llama-3-8B on TPU7x",
              "source": SOURCES["rpa_paper"]}


def rup(x: int, m: int) -> int:
    return -(-x // m) * m


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tile_bytes(rows: int, cols: int, bits: int) -> int:
    """VMEM bytes of a [rows, cols] block of a `bits`-bit dtype under Mosaic's native tiling."""
    pack = max(1, 32 // bits)
    return rup(max(rows, 1), 8 * pack) * rup(max(cols, 1), 128) * bits // 8


def pipeline_time(chip: Chip, *, steps: int, hbm_bytes: float, mxu_s: float, vpu_s: float, dmas: float,
                  first_bytes: float | None = None) -> dict:
    """Predicted time of a double-buffered grid of `steps` (uniform on average) moving `hbm_bytes` in all."""
    o = {k: v["value"] for k, v in OVERHEAD.items()}
    steps = max(1, steps)
    mem = hbm_bytes / chip.hbm_bw / steps
    issue = dmas * o["dma_issue_s"] / steps
    cmp_ = max(mxu_s / steps, vpu_s / steps, issue) + o["step_s"]
    first = (first_bytes if first_bytes is not None else hbm_bytes / steps) / chip.hbm_bw
    t = o["launch_s"] + o["dma_latency_s"] + first + (steps - 1) * max(mem, cmp_) + cmp_
    terms = {"hbm": hbm_bytes / chip.hbm_bw, "mxu": mxu_s, "vpu": vpu_s, "dma_issue": dmas * o["dma_issue_s"],
             "step_overhead": steps * o["step_s"]}
    # what limits it: the fixed costs when they exceed the steady state, else the side of the per-step max
    fixed = o["launch_s"] + o["dma_latency_s"] + first
    if fixed > t - fixed:
        bound = "fixed"
    elif mem >= cmp_:
        bound = "hbm"
    else:
        parts = {"mxu": mxu_s / steps, "vpu": vpu_s / steps, "dma_issue": issue}
        bound = max(parts, key=parts.get) + "+step"
    return {"time_s": t, "bound": bound, "terms_s": terms, "hbm_frac": hbm_bytes / chip.hbm_bw / t}


def mxu_time(chip: Chip, m: int, k: int, n: int, count: float = 1, rate: float | None = None) -> float:
    """x[m,k] @ w[k,n] with w stationary: rows streamed are padded to the array width (a tile's load costs
    mxu_dim cycles however few rows stream through), contraction padded to 128 lanes."""
    return count * 2 * rup(m, chip.mxu_dim) * rup(k, 128) * n / (rate or chip.bf16_flops)


# ----------------------------------------------------------------------------------------------------------
# Kernels. Each returns bytes moved, FLOPs (as computed by the kernel, block-granular), VMEM and the time.
# ----------------------------------------------------------------------------------------------------------
def attention(chip: Chip, *, num_seqs: int, q_len: int, ctx: int, hq: int, hkv: int, d: int, page: int,
              kv_fmt: str, pages_per_block: int, queries_per_block: int, prefetch_next_seq: bool = True,
              decode_queries_per_block: int | None = None, nvfp4_bf16_operands: bool = False) -> dict:
    """kernels_pallas/ragged_paged_attention.py over pools [N, page, Hkv, D], `num_seqs` sequences of `q_len`
    new tokens each at context `ctx` (q_len == 1: decode; q_len == ctx: causal prefill of a fresh sequence).
    Structure modelled as written: a grid over query blocks of bq flat token rows (all kv heads per step);
    in each grid step ONE loop over the (sequence, KV block of ppb pages) pairs of the sequences overlapping
    the block, one DMA per page per pool covering every head (2 pools, 4 with nvfp4 block scales),
    double-buffered across the pairs: the copy of the next pair -- the next KV block, or the first block of
    the next sequence with work -- is started before waiting on the current one (`prefetch_next_seq`, the
    kernel as written). Nothing is prefetched across grid steps (the grid axis is "parallel"), so each grid
    step exposes one DMA (latency + its first block) and its last pair's compute. `prefetch_next_seq=False`
    models a kernel that double-buffers only within a sequence (each sequence's first block exposed), for
    comparison. Every KV block multiplies all G*bq rows of the query block (masked) per head.
    `decode_queries_per_block` (tuning's "decode_queries_per_block", passed by the TPU backend as
    queries_per_block when every sequence has one new token) replaces bq for decode batches (q_len == 1);
    `nvfp4_bf16_operands` (a what-if) feeds the decoded nvfp4 K/V and q to the MXU in bf16 (exact: an E2M1
    value times an e4m3 scale has <= 5 significant bits) instead of f32."""
    o = {k: v["value"] for k, v in OVERHEAD.items()}
    if q_len == 1 and decode_queries_per_block:
        queries_per_block = decode_queries_per_block
    g = hq // hkv
    tokens = num_seqs * q_len
    bq = max(16, min(rup(queries_per_block, 16), rup(tokens, 16)))      # the wrapper's rounding (bf16 q)
    ppb = max(1, min(pages_per_block, cdiv(ctx, page)))
    kvb = ppb * page
    rows = g * bq
    el = KV_ELEM_BYTES[kv_fmt]
    page_bytes = 2 * page * hkv * d * el                          # K and V of one page, all heads
    n_pools = 4 if kv_fmt == "nvfp4" else 2
    # per KV block (all heads): MXU, VPU and DMA issue
    if kv_fmt == "nvfp4":           # f32 operands, K split in even/odd halves, 0/1 scale-expansion matmuls
        f32 = chip.bf16_flops / (1 if nvfp4_bf16_operands else F32_MXU_PASSES)
        mxu_blk = hkv * (2 * mxu_time(chip, rows, d // 2, kvb, rate=f32)
                         + 2 * mxu_time(chip, rows, kvb, d // 2, rate=f32)
                         + 2 * mxu_time(chip, kvb, d // 16, d // 2, rate=f32))
    else:
        mxu_blk = hkv * (mxu_time(chip, rows, d, kvb) + mxu_time(chip, rows, kvb, d))
    vpu_blk = hkv * (2 * kvb * d * ATT_DEQUANT_OPS[kv_fmt] + rows * kvb * SOFTMAX_OPS + 3 * rows * d) / chip.vpu_ops
    steps = iters = nbytes = dmas = flops = mxu_s = vpu_s = exposed_s = 0.0
    t = o["launch_s"] + o["dma_latency_s"]                      # first q block's pipeline prologue
    for qb in range(cdiv(tokens, bq)):
        t0, t1 = qb * bq, min((qb + 1) * bq, tokens)
        t += o["step_s"]
        steps += 1
        step_started = False                        # has this grid step's DMA pipeline been primed yet
        for s_ in range(t0 // q_len, cdiv(t1, q_len)):
            row_hi = min((s_ + 1) * q_len, t1)
            kv_need = ctx - ((s_ + 1) * q_len - row_hi)
            pages = cdiv(kv_need, page)
            nblk = cdiv(kv_need, kvb)
            mem_full = min(ppb, pages) * page_bytes / chip.hbm_bw
            issue = min(ppb, pages) * n_pools * o["dma_issue_s"]
            cmp_ = max(mxu_blk, vpu_blk, issue) + o["kv_iter_s"]
            if nblk == 0:
                continue
            if prefetch_next_seq and step_started:
                exposed = 0.0                       # copied during the previous pair of this grid step
                t += nblk * max(mem_full, cmp_)
            else:                                   # the step's first pair (or every sequence's, no prefetch)
                step_started = True
                exposed = o["dma_latency_s"] + mem_full
                t += exposed + (nblk - 1) * max(mem_full, cmp_) + cmp_
            exposed_s += exposed
            iters += nblk
            nbytes += pages * page_bytes
            dmas += pages * n_pools
            mxu_s += nblk * mxu_blk
            vpu_s += nblk * vpu_blk
            flops += 4 * rows * nblk * kvb * d * hkv
    nbytes += 2 * tokens * hq * d * 2                           # q in, o out
    terms = {"hbm": nbytes / chip.hbm_bw, "mxu": mxu_s, "vpu": vpu_s, "dma_issue": dmas * o["dma_issue_s"],
             "loop_overhead": iters * o["kv_iter_s"] + steps * o["step_s"], "exposed_first_blocks": exposed_s}
    vm = attention_vmem(hq=hq, hkv=hkv, d=d, page=page, kv_fmt=kv_fmt, pages_per_block=ppb, queries_per_block=bq)
    r = {"time_s": t, "bound": max(terms, key=terms.get),
         "terms_s": terms, "hbm_frac": nbytes / chip.hbm_bw / t, "bytes": nbytes, "flops": flops,
         "vmem": vm["vmem"], "vmem_temp": vm["temp"], "vmem_source": vm["source"], "steps": int(steps),
         "kv_iters": int(iters), "dmas": int(dmas), "blocks": {"pages_per_block": ppb, "queries_per_block": bq}}
    if "model" in vm:
        r["vmem_model"] = vm["model"]
    return r


def dequant_ops(chip: Chip, fmt: str) -> int:
    return DEQUANT_OPS[fmt]


def attention_vmem(*, hq: int, hkv: int, d: int, page: int, kv_fmt: str, pages_per_block: int,
                   queries_per_block: int) -> dict:
    """VMEM of the attention kernel's blocks (the kernel's own `vmem_bytes` when importable; this formula,
    written from the same block structure, otherwise): two KV slots x (K, V) of [ppb, page, Hkv, D'] in the
    storage dtype (nvfp4: u8 codes D' = D/2 + e4m3 block scales [.., D/16]) padded on the (Hkv, D') tile,
    double-buffered q and o blocks [Hkv, G, bq, D] bf16, f32 scratch m, l [Hkv, G*bq, 1] and acc
    [Hkv, G*bq, D]. `temp` estimates the per-head intermediates: f32 scores [G*bq, kvb], probabilities,
    and the dequantized K and V of one head."""
    g = hq // hkv
    ppb, bq = pages_per_block, queries_per_block
    rows = g * bq
    kvb = ppb * page
    bits = 16 if kv_fmt == "bf16" else 8
    dk = d // 2 if kv_fmt == "nvfp4" else d
    kv = 2 * 2 * ppb * page * tile_bytes(hkv, dk, bits)
    if kv_fmt == "nvfp4":
        kv += 2 * 2 * ppb * page * tile_bytes(hkv, d // 16, 8)
    qo = 2 * 2 * hkv * g * tile_bytes(bq, d, 16)
    scratch = 2 * hkv * tile_bytes(rows, 1, 32) + hkv * tile_bytes(rows, d, 32)
    own = kv + qo + scratch
    temp = 2 * tile_bytes(rows, kvb, 32) + 2 * tile_bytes(kvb, d, 32 if kv_fmt != "bf16" else 16)
    kern = kernel_vmem("ragged_paged_attention", num_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=page,
                       pages_per_block=ppb, queries_per_block=bq,
                       kv_format=None if kv_fmt == "bf16" else kv_fmt)
    if kern is not None:
        return {"vmem": kern, "temp": temp, "model": own, "source": "kernels_pallas.ragged_paged_attention.vmem_bytes"}
    return {"vmem": own, "temp": temp, "source": "roofline"}


def kv_write(chip: Chip, *, tokens: int, hkv: int, d: int, kv_fmt: str, rows_per_step: int) -> dict:
    """kernels_pallas/kv_write.py: an XLA fusion encodes the new rows (fp8/nvfp4; a no-op cast for bf16), then
    a 1-D grid of rows_per_step tokens: the encoded [r, Hkv, D'] tiles are BlockSpec-pipelined into VMEM and
    each token starts one DMA per pool (2, or 4 with nvfp4 block scales) to its slot; a step waits for its
    own DMAs, so their transfer and completion latency are on the step's critical path."""
    o = {k: v["value"] for k, v in OVERHEAD.items()}
    r_ = min(rows_per_step, tokens)
    steps = cdiv(tokens, r_)
    n_pools = 4 if kv_fmt == "nvfp4" else 2
    stored = 2 * tokens * hkv * d * KV_ELEM_BYTES[kv_fmt]             # encoded K and V rows (+ scales)
    encode = 0.0 if kv_fmt == "bf16" else xla_elementwise(chip, 2 * tokens * hkv * d * 2 + stored)["time_s"]
    mem = stored / steps / chip.hbm_bw
    cmp_ = o["step_s"] + r_ * n_pools * o["dma_issue_s"] + o["dma_latency_s"] + mem
    t = o["launch_s"] + o["dma_latency_s"] + mem + (steps - 1) * max(mem, cmp_) + cmp_
    total = 2 * stored + (0 if kv_fmt == "bf16" else 2 * tokens * hkv * d * 2 + stored)
    terms = {"hbm": total / chip.hbm_bw, "dma_issue": tokens * n_pools * o["dma_issue_s"],
             "dma_latency": steps * o["dma_latency_s"], "step_overhead": steps * o["step_s"]}
    bits = {"bf16": 16, "fp8": 8, "nvfp4": 8}[kv_fmt]
    minors = [d // 2, d // 2, d // 16, d // 16] if kv_fmt == "nvfp4" else [d, d]
    vm = 2 * r_ * sum(tile_bytes(hkv, m, bits) for m in minors)
    res = {"time_s": t + encode, "bound": max(terms, key=terms.get), "terms_s": terms,
           "hbm_frac": total / chip.hbm_bw / (t + encode), "bytes": total, "flops": 0, "vmem": vm, "vmem_temp": 0,
           "steps": steps, "dmas": tokens * n_pools, "vmem_source": "roofline"}
    kv = kernel_vmem("kv_write", rows_per_step=r_, num_kv_heads=hkv, head_dim=d,
                     kv_format=None if kv_fmt == "bf16" else kv_fmt)
    if kv is not None:
        res.update(vmem_model=vm, vmem=kv, vmem_source="kernels_pallas.kv_write.vmem_bytes")
    return res


def kernel_vmem(kernel: str, **kw) -> int | None:
    """The kernel module's own vmem_bytes(...) when it exists (the kernels are written alongside this model);
    None when the module or the function is missing, or when it rejects these arguments."""
    fn = _VMEM_FNS.get(kernel, False)
    if fn is False:
        fn = None
        mod = {"kv_write": "kv_write", "add_rms_norm": "norms", "ragged_paged_attention": "ragged_paged_attention",
               "quantized_matmul": "quant_matmul"}[kernel]
        if USE_KERNEL_VMEM and (ROOT / "kernels_pallas" / f"{mod}.py").exists():
            # a kernel file that exists must import (run with the project's environment): falling back
            # silently would make the chooser's picks depend on how the script was started
            if str(ROOT) not in sys.path:
                sys.path.insert(0, str(ROOT))
            fn = getattr(importlib.import_module(f"kernels_pallas.{mod}"), "vmem_bytes", None)
        _VMEM_FNS[kernel] = fn
    if fn is None:
        return None
    try:
        return int(fn(**kw))
    except TypeError:
        return None


_VMEM_FNS: dict = {}
USE_KERNEL_VMEM = os.environ.get("TPU_ROOFLINE_OWN_VMEM") != "1"


def quantized_matmul(chip: Chip, *, m: int, k: int, n: int, w_fmt: str, block_m: int, block_n: int,
                     block_k: int) -> dict:
    """y[M, N] = x[M, K] @ W[N, K]^T with W stored in `w_fmt` ([N, K] layout, WEIGHT_PARTS of
    lowering/quant/formats.py). Grid (M/bm, N/bn, K/bk), K innermost; W (and its scales) are re-read per
    M block, x per N block. Group scales (int4 [N, K/128] + zeros, nvfp4 [N, K/16]) are blocked [bn, K/g]
    (full last dim), fetched once per N block."""
    bm, bn, bk = matmul_blocks(m, n, k, w_fmt, block_m, block_n, block_k)
    nm, nn, nk = cdiv(m, bm), cdiv(n, bn), cdiv(k, bk)
    steps = nm * nn * nk
    w_bytes = n * k * W_ELEM_BYTES[w_fmt]
    if w_fmt in ("int8", "fp8"):
        w_bytes += 4 * n
    total = w_bytes * nm + m * k * 2 * nn + m * n * 2
    rate = chip.bf16_flops      # weight-only: tiles are dequantized to x's dtype (W8A8 fp8 is not in the kernel)
    mxu_s = mxu_time(chip, bm, bk, bn, count=steps, rate=rate)
    vpu_s = (steps * bn * bk * dequant_ops(chip, w_fmt) + nm * nn * bm * bn * 3) / chip.vpu_ops
    r = pipeline_time(chip, steps=steps, hbm_bytes=total, mxu_s=mxu_s, vpu_s=vpu_s, dmas=3 * steps)
    vm = matmul_vmem(m=m, k=k, n=n, w_fmt=w_fmt, block_m=bm, block_n=bn, block_k=bk)
    r.update(bytes=total, flops=2 * m * n * k, vmem=vm["vmem"], vmem_temp=vm["temp"], steps=steps, dmas=3 * steps,
             vmem_source="roofline", blocks={"block_m": bm, "block_n": bn, "block_k": bk})
    if w_fmt != "bf16":     # bf16 weights stay on XLA's matmul; this models it with the same tiles
        kv = kernel_vmem("quantized_matmul", fmt=w_fmt, block_m=bm, block_n=bn, block_k=bk, in_features=k)
        if kv is not None:  # the kernel's estimate includes its dequantization temporaries
            r.update(vmem_model=vm["vmem"] + vm["temp"], vmem=kv, vmem_temp=0,
                     vmem_source="kernels_pallas.quant_matmul.vmem_bytes")
    return r


def matmul_blocks(m: int, n: int, k: int, w_fmt: str, block_m: int, block_n: int, block_k: int):
    """(bm, bn, bk) the kernel actually uses (mirrors kernels_pallas.quant_matmul.pick_blocks): bm rounded
    down to 16 or all of M, bn to 128 or all of N, bk the largest divisor of K that is a multiple of the
    format's K unit and <= block_k (else the smallest such divisor, else K)."""
    bm = max(16, block_m // 16 * 16)
    bm = m if m <= bm else bm
    bn = n if n <= block_n else max(128, block_n // 128 * 128)
    unit = {"bf16": 128, "int8": 128, "fp8": 128, "int4": math.lcm(256, 8 * 128), "nvfp4": math.lcm(256, 8 * 16)}[w_fmt]
    valid = [c for c in range(unit, k, unit) if k % c == 0]
    if not valid:
        bk = k
    else:
        fitting = [c for c in valid if c <= block_k]
        bk = max(fitting) if fitting else min(valid)
    return bm, bn, bk


def matmul_vmem(*, m: int, k: int, n: int, w_fmt: str, block_m: int, block_n: int, block_k: int) -> dict:
    bm, bn, bk = block_m, block_n, block_k
    x = tile_bytes(bm, bk, 16)
    if w_fmt == "bf16":
        w = tile_bytes(bn, bk, 16)
    elif w_fmt in ("int8", "fp8"):
        w = tile_bytes(bn, bk, 8) + tile_bytes(1, bn, 32)
    elif w_fmt == "int4":
        w = tile_bytes(bn, bk // 2, 8) + tile_bytes(bn, cdiv(k, 128), 16) + tile_bytes(bn, cdiv(k, 128), 8)
    else:
        w = tile_bytes(bn, bk // 2, 8) + tile_bytes(bn, cdiv(k, 16), 8)
    out = tile_bytes(bm, bn, 16)
    acc = tile_bytes(bm, bn, 32)
    temp = 0 if w_fmt == "bf16" else tile_bytes(bn, bk, 16)
    return {"vmem": 2 * (x + w + out) + acc, "temp": temp}


def add_rms_norm(chip: Chip, *, tokens: int, hidden: int, block_rows: int) -> dict:
    """out = rmsnorm(x + residual) * w, new residual = x + residual; bf16 [T, H], grid over row blocks."""
    br = min(block_rows, tokens)
    steps = cdiv(tokens, br)
    total = 4 * tokens * hidden * 2 + hidden * 2
    vpu_s = tokens * hidden * RMSNORM_OPS / chip.vpu_ops
    r = pipeline_time(chip, steps=steps, hbm_bytes=total, mxu_s=0.0, vpu_s=vpu_s, dmas=4 * steps)
    vm = rms_vmem(hidden=hidden, block_rows=br)
    r.update(bytes=total, flops=0, vmem=vm["vmem"], vmem_temp=vm["temp"], steps=steps, dmas=4 * steps,
             vmem_source="roofline")
    kv = kernel_vmem("add_rms_norm", block_rows=br, hidden=hidden, dtype_bytes=2, fused_add=True)
    if kv is not None:     # the kernel's own formula includes its f32 temporaries
        r.update(vmem_model=vm["vmem"] + vm["temp"], vmem=kv, vmem_temp=0,
                 vmem_source="kernels_pallas.norms.vmem_bytes")
    return r


def rms_vmem(*, hidden: int, block_rows: int) -> dict:
    return {"vmem": 2 * 4 * tile_bytes(block_rows, hidden, 16) + 2 * tile_bytes(1, hidden, 16),
            "temp": 2 * tile_bytes(block_rows, hidden, 32)}


def xla_elementwise(chip: Chip, nbytes: float) -> dict:
    t = OVERHEAD["launch_s"]["value"] + nbytes / chip.hbm_bw
    return {"time_s": t, "bytes": nbytes, "hbm_frac": nbytes / chip.hbm_bw / t}


# ----------------------------------------------------------------------------------------------------------
# Models and workloads
# ----------------------------------------------------------------------------------------------------------
MODELS = {
    "llama3-8b": dict(layers=32, hidden=4096, inter=14336, hq=32, hkv=8, d=128, vocab=128256, tied=False),
    "llama3.2-1b": dict(layers=16, hidden=2048, inter=8192, hq=32, hkv=8, d=64, vocab=128256, tied=True),
}
CTX = 4096
# The attention kernel's design the chooser tunes for. "page": the engine's KV page size (compile option
# block_size); None = each generation's recommended page (`recommended_pages()`, kept in tuning.py as
# RECOMMENDED_PAGE_SIZE), an int forces one page for every generation (e.g. the engine's default 16).
# "prefetch_next_seq": True is the kernel as written (the next sequence's first KV block is copied during the
# current pair, within a grid step); False models a kernel without it. "nvfp4_bf16_operands" is a what-if
# (the kernel as written feeds f32 operands to the MXU for nvfp4). `design()` evaluates alternatives.
DESIGN = {"page": None, "prefetch_next_seq": True, "nvfp4_bf16_operands": False}
WHATIF = {"nvfp4_bf16_operands": True}
ENGINE_DEFAULT_PAGE = 16                 # lowering.compile_model's block_size default
PAGE_CANDIDATES = (16, 32, 64, 128)
PAGE_TOLERANCE = 0.01                    # smallest page whose decode time is within 1% (geomean) of the best


@contextlib.contextmanager
def design(**kw):
    old = dict(DESIGN)
    DESIGN.update(kw)
    _CACHE.clear()
    try:
        yield
    finally:
        DESIGN.clear()
        DESIGN.update(old)
        _CACHE.clear()


_CACHE: dict = {}


def page_for(gen: str | None) -> int:
    """The KV page size the model assumes for `gen`: DESIGN["page"] if forced, else the recommended one."""
    if DESIGN["page"]:
        return DESIGN["page"]
    return recommended_pages()[gen] if gen else ENGINE_DEFAULT_PAGE


RECIPES = [("bf16", "bf16"), ("int8", "fp8"), ("int4", "bf16"), ("nvfp4", "nvfp4")]   # (weights, KV)


def model_matmuls(cfg: dict) -> list[tuple[str, int, int, int]]:
    """(name, K, N, count per step) of the decode step's linear layers (lm_head separately)."""
    h, d = cfg["hidden"], cfg["d"]
    return [("qkv", h, (cfg["hq"] + 2 * cfg["hkv"]) * d, cfg["layers"]),
            ("o", cfg["hq"] * d, h, cfg["layers"]),
            ("gate_up", h, 2 * cfg["inter"], cfg["layers"]),
            ("down", cfg["inter"], h, cfg["layers"])]


def decode_step(chip: Chip, blocks: dict, *, model: str, batch: int, w_fmt: str, kv_fmt: str,
                ctx: int = CTX) -> dict:
    """Predicted time of one decode step (batch sequences, one token each, context ctx) and its parts."""
    cfg = MODELS[model]
    L, h = cfg["layers"], cfg["hidden"]
    ra, qm, rn, kw = (blocks["ragged_paged_attention"], blocks["quantized_matmul"], blocks["add_rms_norm"],
                      blocks["kv_write"])
    parts: dict[str, float] = {}
    att = attention(chip, num_seqs=batch, q_len=1, ctx=ctx, hq=cfg["hq"], hkv=cfg["hkv"], d=cfg["d"],
                    page=page_for(chip.name), kv_fmt=kv_fmt, prefetch_next_seq=DESIGN["prefetch_next_seq"],
                    nvfp4_bf16_operands=DESIGN["nvfp4_bf16_operands"], **ra)
    parts["attention"] = L * att["time_s"]
    parts["kv_write"] = L * kv_write(chip, tokens=batch, hkv=cfg["hkv"], d=cfg["d"], kv_fmt=kv_fmt, **kw)["time_s"]
    parts["add_rms_norm"] = (2 * L + 1) * add_rms_norm(chip, tokens=batch, hidden=h, **rn)["time_s"]
    mm = 0.0
    for _, k, n, cnt in model_matmuls(cfg):
        mm += cnt * quantized_matmul(chip, m=batch, k=k, n=n, w_fmt=w_fmt, **qm)["time_s"]
    parts["matmuls"] = mm
    parts["lm_head"] = quantized_matmul(chip, m=batch, k=h, n=cfg["vocab"], w_fmt="bf16", **qm)["time_s"]
    rope = 2 * 2 * batch * (cfg["hq"] + cfg["hkv"]) * cfg["d"] * 2
    silu = 3 * batch * cfg["inter"] * 2
    parts["xla_other"] = L * (xla_elementwise(chip, rope)["time_s"] + xla_elementwise(chip, silu)["time_s"]) \
        + xla_elementwise(chip, batch * h * 2)["time_s"]
    total = sum(parts.values())
    weights = sum(cnt * k * n * W_ELEM_BYTES[w_fmt] for _, k, n, cnt in model_matmuls(cfg)) + h * cfg["vocab"] * 2
    if not cfg["tied"]:
        weights += h * cfg["vocab"] * 2        # the embedding table lives in HBM too (read: one row per token)
    kv_cache = L * batch * ctx * 2 * cfg["hkv"] * cfg["d"] * KV_ELEM_BYTES[kv_fmt]
    return {"time_s": total, "parts_s": parts, "attention_s": parts["attention"],
            "weights_bytes": weights, "kv_bytes": kv_cache, "fits_hbm": weights + kv_cache <= chip.hbm_bytes,
            "tokens_per_s": batch / total}


# ----------------------------------------------------------------------------------------------------------
# Block-size chooser
# ----------------------------------------------------------------------------------------------------------
def budget(chip: Chip) -> float:
    return chip.scoped_vmem_default * OVERHEAD["vmem_margin"]["value"]


def attention_cases(gen: str | None = None):
    """Decode (q_len 1: the kernel gets decode_queries_per_block) at batch 1, 8, 64 in bf16/fp8/nvfp4 KV, and
    prefill / mixed steps (the kernel gets queries_per_block): a fresh 4096-token prefill, a chunked prefill
    of 4 x 512 new tokens on 4096-token contexts, and 64 k+1 = 4-row verifications; both models, the KV page
    of `gen` (page_for)."""
    page = page_for(gen)
    for mname, cfg in MODELS.items():
        for fmt in ("bf16", "fp8", "nvfp4"):
            for b in (1, 8, 64):
                yield dict(num_seqs=b, q_len=1, ctx=CTX, hq=cfg["hq"], hkv=cfg["hkv"], d=cfg["d"], page=page,
                           kv_fmt=fmt)
        for b, q in ((1, CTX), (4, 512), (64, 4)):
            yield dict(num_seqs=b, q_len=q, ctx=CTX, hq=cfg["hq"], hkv=cfg["hkv"], d=cfg["d"], page=page,
                       kv_fmt="bf16")


def matmul_cases(gen: str | None = None):
    for cfg in MODELS.values():
        for m in (1, 64, 2048):
            for fmt in ("int8", "fp8", "int4", "nvfp4"):      # bf16 weights use XLA's matmul
                for _, k, n, _ in model_matmuls(cfg):
                    yield dict(m=m, k=k, n=n, w_fmt=fmt)


def rms_cases(gen: str | None = None):
    for cfg in MODELS.values():
        for t in (1, 8, 64, 2048):
            yield dict(tokens=t, hidden=cfg["hidden"])


def kvw_cases(gen: str | None = None):
    for cfg in MODELS.values():
        for fmt in ("bf16", "fp8", "nvfp4"):
            for t in (1, 64, 2048):
                yield dict(tokens=t, hkv=cfg["hkv"], d=cfg["d"], kv_fmt=fmt)


def pow2(lo: int, hi: int) -> list[int]:
    return [1 << i for i in range(lo.bit_length() - 1, hi.bit_length())]


KERNELS = {
    # kernel: (cost function, candidate grid, tiling-legality predicate, workload)
    "ragged_paged_attention": (
        lambda chip, case, p: attention(chip, prefetch_next_seq=DESIGN["prefetch_next_seq"],
                                        nvfp4_bf16_operands=DESIGN["nvfp4_bf16_operands"], **case, **p),
        {"pages_per_block": pow2(1, 256), "queries_per_block": pow2(16, 512),
         "decode_queries_per_block": pow2(16, 512)},
        # KV slots are [ppb, page, Hkv, D'] (each page its own (Hkv, D') tiles): any ppb; the q block
        # (Hkv, G, bq, D): bq a multiple of 16 (bf16 sublane packing), as the wrapper rounds it.
        lambda p: p["queries_per_block"] % 16 == 0 and p["decode_queries_per_block"] % 16 == 0,
        attention_cases),
    "quantized_matmul": (
        lambda chip, case, p: quantized_matmul(chip, **case, **p),
        {"block_m": pow2(16, 1024), "block_n": pow2(128, 4096), "block_k": pow2(128, 8192)},
        # x [bm, bk] bf16: bm % 16; W [bn, bk(/2)]: bn % 32 (8-bit rows), bk/2 % 128 for packed 4-bit codes.
        lambda p: p["block_m"] % 16 == 0 and p["block_n"] % 128 == 0 and p["block_k"] % 256 == 0,
        matmul_cases),
    "add_rms_norm": (
        lambda chip, case, p: add_rms_norm(chip, **case, **p),
        {"block_rows": pow2(16, 2048)},
        lambda p: p["block_rows"] % 16 == 0,
        rms_cases),
    "kv_write": (
        lambda chip, case, p: kv_write(chip, **case, **p),
        {"rows_per_step": pow2(1, 64)},   # the kernel unrolls a DMA start + wait per row and pool: <= 64
        lambda p: True,                                       # [r, Hkv, D'] blocks: the last two dims are whole
        kvw_cases),
}


def choose(kernel: str, gen: str) -> dict:
    """The tiling-legal block parameters with the smallest summed log predicted time whose VMEM (blocks +
    scratch + temporaries) fits the generation's budget in every workload case; ties -> smaller VMEM."""
    if kernel == "ragged_paged_attention":
        return choose_attention(gen)[0]
    fn, grid, legal, cases = KERNELS[kernel]
    chip = CHIPS[gen]
    best = None
    for values in itertools.product(*grid.values()):
        p = dict(zip(grid.keys(), values))
        if not legal(p):
            continue
        score, peak = 0.0, 0
        for case in cases(gen):
            r = fn(chip, case, p)
            peak = max(peak, r["vmem"] + r["vmem_temp"])
            if peak > budget(chip):
                break
            score += math.log(r["time_s"])
        else:
            key = (round(score, 6), peak)
            if best is None or key < best[0]:
                best = (key, p, peak)
    assert best is not None, f"no legal block shape of {kernel} fits {gen}"
    return dict(best[1])


def _best_query_block(chip: Chip, cases: list, ppb: int):
    """((score, peak VMEM), bq) of the query block minimizing the summed log time of `cases` at ppb."""
    fn, grid, _, _ = KERNELS["ragged_paged_attention"]
    best = None
    for bq in grid["queries_per_block"]:
        p = {"pages_per_block": ppb, "queries_per_block": bq, "decode_queries_per_block": bq}
        score, peak = 0.0, 0
        for case in cases:
            r = fn(chip, case, p)
            peak = max(peak, r["vmem"] + r["vmem_temp"])
            if peak > budget(chip):
                break
            score += math.log(r["time_s"])
        else:
            key = (round(score, 6), peak)
            if best is None or key < best[0]:
                best = (key, bq)
    return best


def choose_attention(gen: str, decode_only: bool = False) -> tuple[dict, float]:
    """(blocks, summed log time) for ragged_paged_attention at page_for(gen). pages_per_block is shared; the
    decode query block (decode cases, q_len 1) and the prefill/mixed one (the other cases) are separable given
    ppb, so each ppb gets its best decode_queries_per_block and queries_per_block, and the ppb with the
    smallest total (ties: smaller VMEM) wins. decode_only: the decode cases alone (for the page choice)."""
    key_ = ("attention", gen, decode_only, DESIGN["page"], DESIGN["prefetch_next_seq"], DESIGN["nvfp4_bf16_operands"])
    if key_ in _CACHE:
        return dict(_CACHE[key_][0]), _CACHE[key_][1]
    chip = CHIPS[gen]
    fn, grid, _, cases = KERNELS["ragged_paged_attention"]
    all_cases = list(cases(gen))
    decode = [c for c in all_cases if c["q_len"] == 1]
    other = [c for c in all_cases if c["q_len"] > 1]
    best = None
    for ppb in grid["pages_per_block"]:
        d = _best_query_block(chip, decode, ppb)
        if d is None:
            continue
        if decode_only:
            key, p = d[0], {"pages_per_block": ppb, "decode_queries_per_block": d[1]}
        else:
            q = _best_query_block(chip, other, ppb)
            if q is None:
                continue
            key = (round(d[0][0] + q[0][0], 6), max(d[0][1], q[0][1]))
            p = {"pages_per_block": ppb, "queries_per_block": q[1], "decode_queries_per_block": d[1]}
        if best is None or key < best[0]:
            best = (key, p)
    assert best is not None, f"no legal block shape of ragged_paged_attention fits {gen}"
    _CACHE[key_] = (best[1], best[0][0])
    return dict(best[1]), best[0][0]


def recommended_pages() -> dict:
    """gen -> the KV page size (engine block_size) to use on it: the smallest of PAGE_CANDIDATES whose decode
    attention (the chooser's decode cases, each page at its own best pages_per_block and decode query block,
    the kernel as written) is within PAGE_TOLERANCE (geometric mean of the times) of the best page's.
    Smaller pages waste less KV memory (half a page per sequence on average) and give the allocator finer
    grain, so a larger page has to buy time to be recommended."""
    key_ = ("pages", DESIGN["prefetch_next_seq"], DESIGN["nvfp4_bf16_operands"])
    if key_ in _CACHE:
        return dict(_CACHE[key_])
    old = DESIGN["page"]
    out = {}
    n = sum(1 for c in attention_cases(None) if c["q_len"] == 1)
    try:
        scores = {}
        for gen in GENERATIONS:
            for page in PAGE_CANDIDATES:
                DESIGN["page"] = page
                scores[gen, page] = choose_attention(gen, decode_only=True)[1] / n
            best = min(scores[gen, pg] for pg in PAGE_CANDIDATES)
            out[gen] = min(pg for pg in PAGE_CANDIDATES if math.exp(scores[gen, pg] - best) <= 1 + PAGE_TOLERANCE)
    finally:
        DESIGN["page"] = old
    out["default"] = ENGINE_DEFAULT_PAGE
    _CACHE[key_] = out
    return dict(out)


def choose_all() -> dict:
    return {k: {g: choose(k, g) for g in GENERATIONS} for k in KERNELS}


# ----------------------------------------------------------------------------------------------------------
# tuning.py: check and write
# ----------------------------------------------------------------------------------------------------------
# Kernels tuning.py did not list when this chooser was written, with the kernel's own off-TPU default
# (kernels_pallas/kv_write.py: DEFAULT_ROWS_PER_STEP), so that adding them changes nothing off TPU.
NEW_KERNEL_DEFAULTS = {"kv_write": {"rows_per_step": 16}}


def load_tuning(name: str = "BLOCK_SIZES") -> dict:
    ns: dict = {}
    exec(compile(TUNING_PATH.read_text(), str(TUNING_PATH), "exec"), ns)
    return ns.get(name, {})


def check(chosen: dict | None = None) -> list[str]:
    """Mismatches between kernels_pallas/tuning.py and the chooser (kernels tuning.py knows; the chooser's
    parameter names only, so names the kernel authors add are left alone), and between tuning.py's
    RECOMMENDED_PAGE_SIZE and `recommended_pages()`."""
    chosen = chosen or choose_all()
    table = load_tuning()
    bad = []
    for kernel, per_gen in chosen.items():
        if kernel not in table:
            continue
        for gen, params in per_gen.items():
            have = table[kernel].get(gen)
            if have is None:
                bad.append(f"{kernel}[{gen}] missing (chooser: {params})")
                continue
            for name, value in params.items():
                if have.get(name) != value:
                    bad.append(f"{kernel}[{gen}].{name} = {have.get(name)!r}, chooser picks {value!r}")
    if "ragged_paged_attention" in table:
        for name in KERNELS["ragged_paged_attention"][1]:
            if name not in table["ragged_paged_attention"].get("default", {}):
                bad.append(f"ragged_paged_attention[default].{name} missing")
    pages = load_tuning("RECOMMENDED_PAGE_SIZE")
    for gen, page in recommended_pages().items():
        if pages.get(gen) != page:
            bad.append(f"RECOMMENDED_PAGE_SIZE[{gen}] = {pages.get(gen)!r}, the model recommends {page!r}")
    return bad


# The "default" (off-TPU, interpret mode) value of a parameter the chooser adds to a kernel tuning.py knows.
NEW_PARAM_DEFAULTS = {"ragged_paged_attention": {"decode_queries_per_block": 16}}


def _replace_assignment(src: str, name: str, text: str) -> str:
    """src with the top-level assignment to `name` replaced by `text` (appended after BLOCK_SIZES if absent)."""
    nodes = [n for n in ast.parse(src).body if isinstance(n, (ast.AnnAssign, ast.Assign))]
    def target(n):
        return ast.unparse(n.target if isinstance(n, ast.AnnAssign) else n.targets[0])
    lines = src.splitlines(keepends=True)
    node = next((n for n in nodes if target(n).split(":")[0].strip() == name), None)
    if node is None:
        anchor = next(n for n in nodes if target(n).startswith("BLOCK_SIZES"))
        return "".join(lines[:anchor.end_lineno]) + "\n" + text + "".join(lines[anchor.end_lineno:])
    return "".join(lines[:node.lineno - 1]) + text + "".join(lines[node.end_lineno:])


def write(chosen: dict) -> None:
    """Replace/add the per-generation entries of kernels tuning.py knows, keeping every other key; add the
    defaults of new parameters (NEW_PARAM_DEFAULTS); rewrite RECOMMENDED_PAGE_SIZE."""
    src = TUNING_PATH.read_text()
    table = load_tuning()
    for kernel, per_gen in chosen.items():
        if kernel not in table:
            if kernel not in NEW_KERNEL_DEFAULTS:
                continue
            table[kernel] = {"default": dict(NEW_KERNEL_DEFAULTS[kernel])}
        for name, value in NEW_PARAM_DEFAULTS.get(kernel, {}).items():
            table[kernel]["default"].setdefault(name, value)
        for gen, params in per_gen.items():
            table[kernel][gen] = {**table[kernel].get(gen, {}), **params}

    def one(d: dict) -> str:
        return "{" + ", ".join(f"{json.dumps(k)}: {v!r}" for k, v in d.items()) + "}"

    out = ["BLOCK_SIZES: dict[str, dict[str, dict[str, int]]] = {"]
    for kernel, per_gen in table.items():
        out.append(f"    {json.dumps(kernel)}: {{")
        for gen, params in per_gen.items():
            note = "  # roofline pick (benchmarks/tpu_roofline.py)" if gen in GENERATIONS and kernel in chosen else ""
            if kernel == "ragged_paged_attention" and gen in GENERATIONS:
                note += f", at pages of {page_for(gen)}"
            out.append(f"        {json.dumps(gen)}: {one(params)},{note}")
        out.append("    },")
    out.append("}")
    src = _replace_assignment(src, "BLOCK_SIZES", "\n".join(out) + "\n")
    pages = recommended_pages()
    text = "RECOMMENDED_PAGE_SIZE: dict[str, int] = {" + ", ".join(
        f"{json.dumps(g)}: {pages[g]}" for g in (*GENERATIONS, "default")) + "}  # model pick (tpu_roofline.py)\n"
    src = _replace_assignment(src, "RECOMMENDED_PAGE_SIZE", text)
    TUNING_PATH.write_text(src)


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def kernel_tables(chosen: dict) -> dict:
    out: dict = {}
    for gen in GENERATIONS:
        chip = CHIPS[gen]
        rows = []
        ra = chosen["ragged_paged_attention"][gen]
        page = page_for(gen)
        for mname, cfg in MODELS.items():
            for b, q, fmts in ((1, 1, KV_FMTS), (8, 1, KV_FMTS), (64, 1, KV_FMTS), (1, CTX, ("bf16",)),
                               (4, 512, ("bf16",)), (64, 4, ("bf16",))):
                for fmt in fmts:
                    r = attention(chip, num_seqs=b, q_len=q, ctx=CTX, hq=cfg["hq"], hkv=cfg["hkv"], d=cfg["d"],
                                  page=page, kv_fmt=fmt, prefetch_next_seq=DESIGN["prefetch_next_seq"],
                                  nvfp4_bf16_operands=DESIGN["nvfp4_bf16_operands"], **ra)
                    rows.append(("ragged_paged_attention", f"{mname} {attention_case_name(b, q, fmt)}", r))
        kw = chosen["kv_write"][gen]
        for fmt in ("bf16", "fp8", "nvfp4"):
            for t in (1, 64):
                r = kv_write(chip, tokens=t, hkv=8, d=128, kv_fmt=fmt, **kw)
                rows.append(("kv_write", f"8b T={t} kv={fmt}", r))
        qm = chosen["quantized_matmul"][gen]
        for m in (1, 64, 2048):
            for fmt in ("bf16", "int8", "fp8", "int4", "nvfp4"):
                r = quantized_matmul(chip, m=m, k=4096, n=14336 * 2, w_fmt=fmt, **qm)
                rows.append(("quantized_matmul", f"8b gate_up M={m} K=4096 N=28672 w={fmt}", r))
        rn = chosen["add_rms_norm"][gen]
        for t in (1, 64, 2048):
            r = add_rms_norm(chip, tokens=t, hidden=4096, **rn)
            rows.append(("add_rms_norm", f"T={t} H=4096", r))
        keep = ("bytes", "flops", "vmem", "vmem_temp", "vmem_source", "steps", "time_s", "hbm_frac", "bound")
        out[gen] = [{"kernel": k, "case": c, **{x: r[x] for x in keep}} for k, c, r in rows]
    return out


KV_FMTS = ("bf16", "fp8", "nvfp4")


def attention_case_name(b: int, q: int, fmt: str) -> str:
    if q == 1:
        return f"decode B={b} ctx={CTX} kv={fmt}"
    if q == CTX:
        return f"prefill 1x{CTX} causal kv={fmt}"
    return f"{'chunked prefill' if q > 8 else 'verify'} {b}x{q} on ctx={CTX} kv={fmt}"


def page_study() -> list[dict]:
    """Decode attention at batch 64, ctx 4096 by KV page size, with the kernel's in-step cross-sequence
    prefetch (as written) and without it, each page at the pages_per_block and decode query block the
    chooser picks for the decode cases at that page."""
    rows = []
    for gen in GENERATIONS:
        chip = CHIPS[gen]
        for pre in (True, False):
            for page in PAGE_CANDIDATES:
                with design(page=page, prefetch_next_seq=pre):
                    p = choose_attention(gen, decode_only=True)[0]
                    for mname, fmt in (("llama3-8b", "bf16"), ("llama3-8b", "fp8"), ("llama3.2-1b", "bf16")):
                        cfg = MODELS[mname]
                        r = attention(chip, num_seqs=64, q_len=1, ctx=CTX, hq=cfg["hq"], hkv=cfg["hkv"], d=cfg["d"],
                                      page=page, kv_fmt=fmt, prefetch_next_seq=pre, queries_per_block=16, **p)
                        rows.append({"gen": gen, "prefetch_next_seq": pre, "page": page, "model": mname, "kv": fmt,
                                     **p, "time_s": r["time_s"], "hbm_frac": r["hbm_frac"], "bound": r["bound"]})
    return rows


GOAL = 0.85      # issue 6: decode attention at >= 85% of HBM bandwidth on each generation
GOAL_CASES = (("llama3-8b", "bf16"), ("llama3-8b", "fp8"), ("llama3-8b", "nvfp4"), ("llama3.2-1b", "bf16"),
              ("llama3.2-1b", "fp8"))


def goal_table(chosen: dict) -> list[dict]:
    """Decode attention at batch 64, ctx 4096: the kernel as written, tuned blocks, decode query blocks, at
    the recommended page and at the engine's default page 16 (pages_per_block scaled to the same KV block in
    tokens, as kernels_pallas.tuning.attention_blocks does)."""
    rows = []
    for gen in GENERATIONS:
        chip = CHIPS[gen]
        ra = chosen["ragged_paged_attention"][gen]
        for page in dict.fromkeys((page_for(gen), ENGINE_DEFAULT_PAGE)):
            # the same KV block in tokens at another page (kernels_pallas.tuning.attention_blocks)
            blocks = {**ra, "pages_per_block": max(1, ra["pages_per_block"] * page_for(gen) // page)}
            for mname, fmt in GOAL_CASES:
                cfg = MODELS[mname]
                r = attention(chip, num_seqs=64, q_len=1, ctx=CTX, hq=cfg["hq"], hkv=cfg["hkv"], d=cfg["d"],
                              page=page, kv_fmt=fmt, prefetch_next_seq=DESIGN["prefetch_next_seq"],
                              nvfp4_bf16_operands=DESIGN["nvfp4_bf16_operands"], **blocks)
                rows.append({"gen": gen, "page": page, "pages_per_block": blocks["pages_per_block"], "recommended_page": page == page_for(gen), "model": mname,
                             "kv": fmt, **{k: r[k] for k in ("bytes", "flops", "vmem", "vmem_temp", "time_s",
                                                             "hbm_frac", "bound")},
                             "meets_goal": r["hbm_frac"] >= GOAL})
    return rows


def fmt_bytes(x: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= div:
            return f"{x / div:.1f} {unit}"
    return f"{x:.0f} B"


def decode_steps(chosen: dict) -> list[dict]:
    rows = []
    for mname in MODELS:
        for gen in GENERATIONS:
            per = {k: v[gen] for k, v in chosen.items()}
            for b in (1, 64):
                for w, kv in RECIPES:
                    r = decode_step(CHIPS[gen], per, model=mname, batch=b, w_fmt=w, kv_fmt=kv)
                    rows.append({"model": mname, "gen": gen, "batch": b, "weights": w, "kv": kv, **r})
    return rows


def print_kernels(tables: dict, only: str | None = None) -> None:
    for g, rows in tables.items():
        print(f"\n== {g} ==")
        print(f"{'kernel':22} {'case':46} {'bytes':>9} {'GFLOP':>8} {'VMEM':>8} {'time us':>9} {'%HBM':>5} bound")
        for r in rows:
            if only and r["kernel"] != only:
                continue
            print(f"{r['kernel'][:22]:22} {r['case'][:46]:46} {fmt_bytes(r['bytes']):>9} {r['flops'] / 1e9:8.2f} "
                  f"{r['vmem'] / MiB:7.2f}M {r['time_s'] * 1e6:9.1f} {100 * r['hbm_frac']:5.1f} {r['bound']}")


def print_steps(steps: list[dict]) -> None:
    print(f"{'model':12} {'gen':4} {'B':>3} {'weights/KV':11} {'step ms':>8} {'attn ms':>8} {'tok/s':>8} fits")
    for r in steps:
        print(f"{r['model']:12} {r['gen']:4} {r['batch']:3} {r['weights'] + '/' + r['kv']:11} {r['time_s'] * 1e3:8.3f} "
              f"{r['attention_s'] * 1e3:8.3f} {r['tokens_per_s']:8.0f} {'yes' if r['fits_hbm'] else 'NO'}")


DOC_PATH = ROOT / "docs" / "tpu-roofline.md"
DOC_BEGIN, DOC_END = "<!-- roofline tables: begin (generated by benchmarks/tpu_roofline.py --doc) -->", \
    "<!-- roofline tables: end -->"


def markdown(chosen: dict, tables: dict, steps: list, goal: list, whatif: dict, study: list) -> str:
    """The generated part of docs/tpu-roofline.md (all numbers are model predictions)."""
    L = []
    w = L.append
    pages = recommended_pages()
    w("### Per-device figures used\n")
    w("| | HBM GB/s | HBM GB | VMEM MiB | default scoped VMEM MiB | bf16 TFLOP/s | int8 TOP/s | fp8 TFLOP/s | "
      "MXUs x width | derived VPU Top/s |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for g, c in CHIPS.items():
        w(f"| {g} | {c.hbm_bw / 1e9:.0f} | {c.hbm_bytes / 1e9:.1f} | {c.vmem_bytes // MiB} | "
          f"{c.scoped_vmem_default // MiB} | {c.bf16_flops / 1e12:.1f} | {c.int8_ops / 1e12 or '-'} | "
          f"{c.fp8_flops / 1e12 or '-'} | {c.num_mxus} x {c.mxu_dim} | {c.vpu_ops / 1e12:.1f} |")
    w("\n### Recommended KV page size and chosen block sizes (kernels_pallas/tuning.py)\n")
    w("| | v5e | v6e | v7 |")
    w("|---|---|---|---|")
    w("| RECOMMENDED_PAGE_SIZE (engine block_size) | " + " | ".join(str(pages[g]) for g in GENERATIONS) + " |")
    for k, per in chosen.items():
        w(f"| {k} | " + " | ".join(", ".join(f"{n}={v}" for n, v in per[g].items()) for g in GENERATIONS) + " |")
    w(f"\n### Decode attention goal (>= {GOAL:.0%} of HBM bandwidth): batch 64, ctx {CTX}, kernel as written, "
      "tuned blocks (decode_queries_per_block), at the recommended page and at the engine's default page 16 "
      "(pages_per_block scaled to the same KV block in tokens: tuning.attention_blocks)\n")
    w("| gen | page | ppb | model | KV | bytes moved | GFLOP | VMEM MiB (+ temporaries) | predicted us | "
      "% of HBM BW | limited by | >= 85% |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in goal:
        page = f"{r['page']}" + (" (recommended)" if r["recommended_page"] else "")
        w(f"| {r['gen']} | {page} | {r['pages_per_block']} | {r['model']} | {r['kv']} | {fmt_bytes(r['bytes'])} | {r['flops'] / 1e9:.2f} | "
          f"{r['vmem'] / MiB:.2f} (+{r['vmem_temp'] / MiB:.2f}) | {r['time_s'] * 1e6:.1f} | "
          f"{100 * r['hbm_frac']:.0f}% | {r['bound']} | {'yes' if r['meets_goal'] else 'no'} |")
    for kernel in KERNELS:
        pg = (", KV pages " + ", ".join(f"{g}: {pages[g]}" for g in GENERATIONS)
              if kernel == "ragged_paged_attention" else "")
        w(f"\n### {kernel}: as written{pg}\n")
        w("| gen | case | bytes moved | GFLOP | VMEM MiB | predicted us | % of HBM BW | limited by |")
        w("|---|---|---|---|---|---|---|---|")
        for g in GENERATIONS:
            for r in tables[g]:
                if r["kernel"] == kernel:
                    w(f"| {g} | {r['case']} | {fmt_bytes(r['bytes'])} | {r['flops'] / 1e9:.2f} | "
                      f"{r['vmem'] / MiB:.2f} | {r['time_s'] * 1e6:.1f} | {100 * r['hbm_frac']:.0f}% | {r['bound']} |")
    w("\n### ragged_paged_attention: what-if, bf16 MXU operands for nvfp4 KV (blocks "
      + ", ".join(f"{g}: {p}" for g, p in whatif["attention_blocks"].items()) + ")\n")
    w("| gen | case | bytes moved | VMEM MiB | predicted us | % of HBM BW | limited by |")
    w("|---|---|---|---|---|---|---|")
    for g in GENERATIONS:
        for r in whatif["kernels"][g]:
            if r["kernel"] == "ragged_paged_attention" and "B=64" in r["case"] and "nvfp4" in r["case"]:
                w(f"| {g} | {r['case']} | {fmt_bytes(r['bytes'])} | {r['vmem'] / MiB:.2f} | "
                  f"{r['time_s'] * 1e6:.1f} | {100 * r['hbm_frac']:.0f}% | {r['bound']} |")
    w(f"\n### Decode step, context {CTX} per sequence: kernels as written, recommended KV pages\n")
    w("| model | gen | batch | weights / KV | step ms | attention ms (all layers) | tokens/s | fits HBM |")
    w("|---|---|---|---|---|---|---|---|")
    for r in steps:
        w(f"| {r['model']} | {r['gen']} | {r['batch']} | {r['weights']} / {r['kv']} | {r['time_s'] * 1e3:.2f} | "
          f"{r['attention_s'] * 1e3:.2f} | {r['tokens_per_s']:.0f} | {'yes' if r['fits_hbm'] else 'no'} |")
    w(f"\n### Decode attention (batch 64, ctx {CTX}) by page size, with the kernel's in-step cross-sequence "
      "prefetch (as written) and without it; each page at its own decode-tuned blocks\n")
    w("| gen | cross-seq prefetch | page | model | KV | ppb | decode bq | predicted us | % of HBM BW | limited by |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for r in study:
        w(f"| {r['gen']} | {'yes (as written)' if r['prefetch_next_seq'] else 'no'} | {r['page']} | {r['model']} | "
          f"{r['kv']} | {r['pages_per_block']} | {r['decode_queries_per_block']} | {r['time_s'] * 1e6:.1f} | "
          f"{100 * r['hbm_frac']:.0f}% | {r['bound']} |")
    return "\n".join(L) + "\n"


def write_doc(text: str) -> None:
    doc = DOC_PATH.read_text()
    i, j = doc.index(DOC_BEGIN), doc.index(DOC_END)
    DOC_PATH.write_text(doc[:i + len(DOC_BEGIN)] + "\n" + text + doc[j:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="verify kernels_pallas/tuning.py equals the chooser's picks")
    ap.add_argument("--write", action="store_true", help="write the chosen per-generation entries into tuning.py")
    ap.add_argument("--out", default=str(ROOT / "bench_results" / "tpu_roofline.json"))
    ap.add_argument("--quiet", action="store_true", help="print only the figures, chosen blocks and decode steps")
    ap.add_argument("--doc", action="store_true", help="regenerate the tables of docs/tpu-roofline.md")
    args = ap.parse_args(argv)

    chosen = choose_all()
    if args.check:
        bad = check(chosen)
        for b in bad:
            print("MISMATCH", b)
        print("tuning.py matches the roofline chooser" if not bad else f"{len(bad)} mismatches")
        return 1 if bad else 0
    if args.write:
        write(chosen)
        print(f"wrote {TUNING_PATH.relative_to(ROOT)}")

    print("PREDICTIONS of a roofline model (no TPU measured). Per JAX device; TPU7x device = 1 TensorCore.\n")
    print(f"{'gen':4} {'HBM GB/s':>9} {'HBM GB':>7} {'VMEM MiB':>8} {'scoped':>6} {'bf16 TF':>8} {'int8 TOP':>8} "
          f"{'fp8 TF':>7} {'VPU Top/s':>9}")
    for g, c in CHIPS.items():
        print(f"{g:4} {c.hbm_bw / 1e9:9.0f} {c.hbm_bytes / 1e9:7.1f} {c.vmem_bytes / MiB:8.0f} "
              f"{c.scoped_vmem_default / MiB:6.0f} {c.bf16_flops / 1e12:8.1f} {c.int8_ops / 1e12:8.0f} "
              f"{c.fp8_flops / 1e12:7.0f} {c.vpu_ops / 1e12:9.1f}")
    print(f"\nchosen block sizes for the kernels as written ({DESIGN}):")
    for k, per in chosen.items():
        for g, p in per.items():
            print(f"  {k:24} {g:4} {p}")
    pages = recommended_pages()
    print(f"\nrecommended KV page size (engine block_size): {pages}")
    tables = kernel_tables(chosen)
    if not args.quiet:
        print_kernels(tables)
    steps = decode_steps(chosen)
    print(f"\ndecode step, ctx {CTX} per sequence, the kernels as written ({DESIGN}, pages {pages}):")
    print_steps(steps)
    goal = goal_table(chosen)
    print(f"\ndecode attention B=64 ctx {CTX}, goal >= {GOAL:.0%} of HBM bandwidth:")
    for r in goal:
        print(f"  {r['gen']:4} page={r['page']:3} {r['model']:12} kv={r['kv']:5} {r['time_s'] * 1e6:8.1f} us "
              f"{100 * r['hbm_frac']:5.1f}% {r['bound']:10} {'meets' if r['meets_goal'] else 'MISSES'}")

    with design(**WHATIF):
        rec_attn = {g: choose("ragged_paged_attention", g) for g in GENERATIONS}
        rec = {**chosen, "ragged_paged_attention": rec_attn}
        rec_tables = kernel_tables(rec)
        rec_steps = decode_steps(rec)
        print(f"\nWHAT-IF design {DESIGN}: attention blocks {rec_attn}")
        if not args.quiet:
            print_kernels(rec_tables, only="ragged_paged_attention")
    study = page_study()
    if not args.quiet:
        print("\ndecode attention B=64 by page size / cross-sequence prefetch (decode-tuned blocks per page):")
        for r in study:
            print(f"  {r['gen']:4} prefetch={r['prefetch_next_seq']!s:5} page={r['page']:3} {r['model']:12} "
                  f"kv={r['kv']:5} ppb={r['pages_per_block']:3} dbq={r['decode_queries_per_block']:3} "
                  f"{r['time_s'] * 1e6:8.1f} us {100 * r['hbm_frac']:5.1f}% {r['bound']}")
    out = {"note": "predictions of a roofline model; nothing here was measured (no TPU reachable)",
           "chips": {g: {**dataclasses.asdict(c), "clock_hz_derived": c.clock_hz, "vpu_ops_derived": c.vpu_ops}
                     for g, c in CHIPS.items()},
           "sources": SOURCES, "overhead": OVERHEAD, "dequant_ops": DEQUANT_OPS, "anchor": RPA_ANCHOR,
           "design": dict(DESIGN), "recommended_page_size": pages, "chosen": chosen, "kernels": tables,
           "decode_steps": steps, "decode_attention_goal": goal,
           "whatif_design": {**WHATIF, "attention_blocks": rec_attn, "kernels": rec_tables,
                             "decode_steps": rec_steps},
           "page_study": study}
    if args.doc:
        write_doc(markdown(chosen, tables, steps, goal, out["whatif_design"], study))
        print(f"rewrote the tables of {DOC_PATH.relative_to(ROOT)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
