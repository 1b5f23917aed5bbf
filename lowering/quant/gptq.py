"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's rounding error
over the columns not yet quantized in proportion to the inverse Hessian of the layer's inputs, H = X^T X.

Group parameters (int4 scale/zero, nvfp4 block scales) are chosen from the error-updated weights when the
sweep reaches a group's first column; the output is exactly a formats.py encoding (same parts as RTN).
"""
from __future__ import annotations

import numpy as np

from lowering.quant import formats

BLOCK = 128  # columns updated together (lazy batch updates); a multiple of every group size used
DAMP = 0.01
# fp8 (W8A8) needs much stronger dampening: with the default ~1k calibration tokens, H of a 576- or
# 1536-wide input is poorly determined, and at 1% GPTQ fits the calibration text (SmolLM2-135M, W8A8 on
# 16 x 256 tokens of tinyshakespeare: RTN +3.5%, damp 0.01 +1.8%, 0.1 +1.7%, 0.3 +0.8%)
FP8_DAMP = 0.3


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, fmt: str, *, group_size: int | None = None,
                  damp: float | None = None) -> dict[str, np.ndarray]:
    """w f32[N, K], hessian f64[K, K] (sum of x x^T over calibration inputs) -> format parts.

    damp: added to H's diagonal as a fraction of its mean (None: FP8_DAMP for fp8, DAMP otherwise)."""
    if fmt == "fp8":
        return gptq_quantize_fp8(w, hessian, damp=FP8_DAMP if damp is None else damp)
    damp = DAMP if damp is None else damp
    if fmt not in ("int4", "nvfp4"):
        raise formats.FormatError(f"GPTQ supports int4, nvfp4 and fp8, not {fmt!r}")
    w = np.array(w, np.float64)
    n, k = w.shape
    group = (group_size or formats.int4_group_size(k) or formats.INT4_GROUP) if fmt == "int4" else formats.NVFP4_BLOCK
    formats.check_weight_format(fmt, (n, k), group_size)
    w, h = _prepare_hessian(w, hessian, damp)
    gs = formats.nvfp4_global_scale(np.abs(w).max()) if fmt == "nvfp4" else None
    codes = np.zeros((n, k), np.uint8)
    group_params: list = []

    def quantize(col, w1, i):
        if col % group == 0:  # group parameters from the error-updated weights of the group's columns
            wg = w1[:, i:i + group].astype(np.float32)
            group_params.append(formats.int4_group_params(wg) if fmt == "int4" else formats.nvfp4_block_scales(wg, gs))
        col_w = w1[:, i].astype(np.float32)
        if fmt == "int4":
            scale, zero = group_params[-1]
            c = formats.int4_codes(col_w, scale, zero)
            q = (c.astype(np.float32) - zero.astype(np.float32)) * scale.astype(np.float32)
        else:
            bs = group_params[-1]
            c = formats.nvfp4_codes(col_w, bs, gs)
            q = formats.e2m1_decode(c) * (bs.astype(np.float32) * np.float32(gs))
        codes[:, col] = c
        return q

    _sweep(w, h, quantize)
    packed = formats.pack_nibbles(codes)
    if fmt == "int4":
        return {"q": packed, "scale": np.stack([p[0] for p in group_params], axis=1),
                "zero": np.stack([p[1] for p in group_params], axis=1)}
    return {"q": packed, "block_scale": np.stack(group_params, axis=1),
            "global_scale": np.asarray(gs, np.float32).reshape(())}


def _sweep(w: np.ndarray, h: np.ndarray, quantize) -> None:
    """The GPTQ column sweep over w f64[N, K] with damped H f64[K, K], in f32 with lazy batch updates of BLOCK
    columns: quantize(col, w1, i) quantizes column col (= i of the current block w1, error-updated so far),
    records its codes and returns its dequantized f32 values; the rounding error is spread over the columns
    not yet quantized through the upper Cholesky factor of H^-1 (factored in f64)."""
    k = w.shape[1]
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)  # row i: column i's propagation weights
    w = w.astype(np.float32)  # the column sweep in f32, as GPTQ does on GPUs
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            e = (w1[:, i] - quantize(i1 + i, w1, i)) / h1[i, i]
            w1[:, i + 1:] -= e[:, None] * h1[i, i + 1:]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]


def _prepare_hessian(w: np.ndarray, hessian: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """(w f64 with dead input columns zeroed, damped H f64)."""
    w = np.array(w, np.float64)
    k = w.shape[1]
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian shape {hessian.shape} does not match in_features {k}")
    h = np.array(hessian, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += np.eye(k) * (damp * np.mean(np.diag(h)))
    return w, h


def gptq_quantize_fp8(w: np.ndarray, hessian: np.ndarray, *, damp: float = FP8_DAMP) -> dict[str, np.ndarray]:
    """GPTQ on the fp8 e4m3 grid with per-output-channel scales (formats.quantize_fp8_rows's encoding).

    The row scales are fixed up front from the original weight (amax / 448, as RTN), so columns can be
    visited in any order: in decreasing order of H's diagonal ("act order"), which quantizes the columns
    whose inputs carry the most energy first, while the most error can still be compensated. Updated
    weights beyond the row's range saturate at +-448 * scale, as RTN would.
    """
    n, k = w.shape
    formats.check_weight_format("fp8", (n, k))
    scale = formats.fp8_scale(np.abs(np.asarray(w, np.float32)).max(axis=1))
    w, h = _prepare_hessian(w, hessian, damp)
    perm = np.argsort(-np.diag(h), kind="stable")
    w, h = w[:, perm], h[np.ix_(perm, perm)]
    q = np.zeros((n, k), formats.FP8)

    def quantize(col, w1, i):
        q[:, col] = formats.to_fp8(w1[:, i] / scale)
        return q[:, col].astype(np.float32) * scale

    _sweep(w, h, quantize)
    out = np.empty_like(q)
    out[:, perm] = q
    return {"q": out, "scale": scale}
