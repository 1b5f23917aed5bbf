"""Block sizes of the Pallas TPU kernels, kept as data.

The values are chosen from the roofline model in `benchmarks/tpu_roofline.py` (see docs/tpu-roofline.md):
for each TPU generation, the block shape that keeps each kernel's VMEM footprint (double-buffered) under
the generation's scoped-VMEM budget while moving enough bytes per grid step to hide the per-step overhead.
Kernels take explicit overrides; `block_sizes()` gives the defaults for the running (or named) generation.

ragged_paged_attention has two query-block sizes: "queries_per_block" for steps with any sequence of more
than one new token (prefill, chunked prefill, verification) and "decode_queries_per_block" for steps where
every sequence has exactly one new token (the TPU backend passes it as the kernel's queries_per_block).
Its "pages_per_block" counts KV pages, and the per-generation values are tuned at that generation's
RECOMMENDED_PAGE_SIZE (the KV block is pages_per_block x page tokens).

RECOMMENDED_PAGE_SIZE is the KV page size (the engine's `block_size` compile option) the roofline model
recommends per generation: the smallest page whose predicted decode attention is within 1% of the best page
size's (docs/tpu-roofline.md, "page size"); "default" is the engine's default, 16.
"""
from __future__ import annotations

import copy

# kernel -> generation -> parameters. "default" is used off-TPU (interpret mode) and for unknown chips.
BLOCK_SIZES: dict[str, dict[str, dict[str, int]]] = {
    "ragged_paged_attention": {
        "default": {"pages_per_block": 8, "queries_per_block": 32, "decode_queries_per_block": 16},
        "v5e": {"pages_per_block": 16, "queries_per_block": 64, "decode_queries_per_block": 32},  # roofline pick (benchmarks/tpu_roofline.py), at pages of 16
        "v6e": {"pages_per_block": 16, "queries_per_block": 128, "decode_queries_per_block": 32},  # roofline pick (benchmarks/tpu_roofline.py), at pages of 32
        "v7": {"pages_per_block": 16, "queries_per_block": 64, "decode_queries_per_block": 32},  # roofline pick (benchmarks/tpu_roofline.py), at pages of 32
    },
    "quantized_matmul": {
        "default": {"block_m": 128, "block_n": 256, "block_k": 512},
        "v5e": {"block_m": 512, "block_n": 512, "block_k": 1024},  # roofline pick (benchmarks/tpu_roofline.py)
        "v6e": {"block_m": 512, "block_n": 1024, "block_k": 1024},  # roofline pick (benchmarks/tpu_roofline.py)
        "v7": {"block_m": 512, "block_n": 1024, "block_k": 1024},  # roofline pick (benchmarks/tpu_roofline.py)
    },
    "add_rms_norm": {
        "default": {"block_rows": 256},
        "v5e": {"block_rows": 32},  # roofline pick (benchmarks/tpu_roofline.py)
        "v6e": {"block_rows": 64},  # roofline pick (benchmarks/tpu_roofline.py)
        "v7": {"block_rows": 128},  # roofline pick (benchmarks/tpu_roofline.py)
    },
    "gmm": {
        "default": {"block_m": 128, "block_n": 256, "block_k": 512},
    },
    "kv_write": {
        "default": {"rows_per_step": 16},
        "v5e": {"rows_per_step": 64},  # roofline pick (benchmarks/tpu_roofline.py)
        "v6e": {"rows_per_step": 64},  # roofline pick (benchmarks/tpu_roofline.py)
        "v7": {"rows_per_step": 64},  # roofline pick (benchmarks/tpu_roofline.py)
    },
}


# generation -> recommended KV page size in tokens (the engine's block_size); written by tpu_roofline.py --write.
RECOMMENDED_PAGE_SIZE: dict[str, int] = {"v5e": 16, "v6e": 32, "v7": 32, "default": 16}  # model pick (tpu_roofline.py)


def tpu_generation() -> str | None:
    """'v5e' | 'v6e' | 'v7' | ... of the first TPU device, or None when JAX runs on no TPU."""
    import jax

    try:
        devices = jax.devices()
    except RuntimeError:
        return None
    if not devices or devices[0].platform != "tpu":
        return None
    kind = devices[0].device_kind.lower()  # e.g. "TPU v5 lite", "TPU v6e", "TPU7x"
    if "v5 lite" in kind or "v5e" in kind:
        return "v5e"
    if "v6" in kind:
        return "v6e"
    if "7" in kind:
        return "v7"
    return kind


def block_sizes(kernel: str, generation: str | None = None) -> dict[str, int]:
    """The tuned block parameters of `kernel` for `generation` (default: the running chip, else "default")."""
    if kernel not in BLOCK_SIZES:
        raise KeyError(f"no block sizes for kernel {kernel!r}; known: {', '.join(sorted(BLOCK_SIZES))}")
    table = BLOCK_SIZES[kernel]
    gen = generation or tpu_generation() or "default"
    return copy.deepcopy(table.get(gen, table["default"]))


def recommended_page_size(generation: str | None = None) -> int:
    """The KV page size (engine block_size) the roofline model recommends for `generation` (default: the
    running chip, else "default" = the engine's default 16)."""
    gen = generation or tpu_generation() or "default"
    return RECOMMENDED_PAGE_SIZE.get(gen, RECOMMENDED_PAGE_SIZE.get("default", 16))


def attention_blocks(block_size: int, *, decode: bool, generation: str | None = None) -> dict[str, int]:
    """ragged_paged_attention keyword arguments for KV pages of `block_size` tokens: `pages_per_block` scaled
    so the KV block keeps the token count it was tuned for (tuned at RECOMMENDED_PAGE_SIZE[generation]), and
    `queries_per_block` = "decode_queries_per_block" when every sequence of the step has one new token
    (decode=True), else "queries_per_block"."""
    gen = generation or tpu_generation() or "default"
    p = block_sizes("ragged_paged_attention", gen)
    tuned_page = RECOMMENDED_PAGE_SIZE.get(gen, RECOMMENDED_PAGE_SIZE.get("default", 16))
    ppb = max(1, p["pages_per_block"] * tuned_page // max(1, block_size))
    bq = p["decode_queries_per_block"] if decode else p["queries_per_block"]
    return {"pages_per_block": ppb, "queries_per_block": bq}
