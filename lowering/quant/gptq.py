"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's rounding error
over the columns not yet quantized in proportion to the inverse Hessian of the layer's inputs, H = X^T X.

Group parameters (int4 scale/zero, nvfp4 block scales) are chosen from the error-updated weights when the
sweep reaches a group's first column; the output is exactly a formats.py encoding (same parts as RTN).
"""
from __future__ import annotations

import numpy as np

from lowering.quant import formats

BLOCK = 128  # columns updated together (lazy batch updates); a multiple of every group size used


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, fmt: str, *, group_size: int | None = None,
                  damp: float = 0.01) -> dict[str, np.ndarray]:
    """w f32[N, K], hessian f64[K, K] (sum of x x^T over calibration inputs) -> format parts."""
    if fmt not in ("int4", "nvfp4"):
        raise formats.FormatError(f"GPTQ supports int4 and nvfp4, not {fmt!r}")
    w = np.array(w, np.float64)
    n, k = w.shape
    group = (group_size or formats.int4_group_size(k) or formats.INT4_GROUP) if fmt == "int4" else formats.NVFP4_BLOCK
    formats.check_weight_format(fmt, (n, k), group_size)
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian shape {hessian.shape} does not match in_features {k}")
    h = np.array(hessian, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += np.eye(k) * (damp * np.mean(np.diag(h)))
    # upper Cholesky factor of H^-1: row i holds the error-propagation weights for column i
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)
    w = w.astype(np.float32)  # the column sweep in f32 (as GPTQ does on GPUs); H^-1 factored in f64

    gs = formats.nvfp4_global_scale(np.abs(w).max()) if fmt == "nvfp4" else None
    codes = np.zeros((n, k), np.uint8)
    group_params: list = []
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:
                wg = w1[:, i:i + group].astype(np.float32)
                if fmt == "int4":
                    scale, zero = formats.int4_group_params(wg)
                    group_params.append((scale, zero))
                else:
                    bs = formats.nvfp4_block_scales(wg, gs)
                    group_params.append(bs)
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
            e = (w1[:, i] - q) / h1[i, i]
            w1[:, i + 1:] -= e[:, None] * h1[i, i + 1:]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    packed = formats.pack_nibbles(codes)
    if fmt == "int4":
        return {"q": packed, "scale": np.stack([p[0] for p in group_params], axis=1),
                "zero": np.stack([p[1] for p in group_params], axis=1)}
    return {"q": packed, "block_scale": np.stack(group_params, axis=1),
            "global_scale": np.asarray(gs, np.float32).reshape(())}
