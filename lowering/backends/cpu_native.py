"""Native CPU matmul on GGUF quantized weights (XLA FFI custom calls).

  gguf_matmul(x, *parts, format=...) -> f32[M, N] = x f32[M, K] @ W^T, W[N, K] kept in GGUF's blocks:

  "q4_1"  q u8[N, K/2], d f16[N, K/32], m f16[N, K/32]. Block b of row n covers k = 32b..32b+31; byte j
          (0..15) of the block holds element 32b+j in its LOW nibble and 32b+j+16 in its HIGH nibble (GGUF's
          own order, not formats.pack_nibbles'). w = fl32(fl32(d * code) + m), a separate multiply then add.
  "q8_0"  q i8[N, K], d f16[N, K/32]; w = fl32(q * d).

The weights are bit-identical to gguf-py's (gguf.quants.dequantize, which Hugging Face uses); only the
summation order of x . w differs from an f32 matmul on the dequantized weights. The formats, their numpy
reference (dequantize_gguf) and the converter from GGUF block bytes live in lowering.quant.formats.

The kernel (cpu_native.cc) is compiled once per source hash with the machine's g++ into
$LLMC_CACHE/native/ (default ~/.cache/llmc/native/) and registered with jax.ffi for platform "cpu".
available() says whether that worked; unavailable_reason() says why not. Nothing here raises at import.
LLMC_NATIVE_NO_AVX512=1 builds the portable scalar path instead (for testing it).
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from lowering.quant.formats import GGUF_BLOCK, GGUF_FORMATS, WEIGHT_PARTS

_SOURCE = Path(__file__).with_name("cpu_native.cc")
_TARGETS = {"q4_1": ("llmc_gguf_matmul_q4_1", "LlmcGgufMatmulQ4_1"),
            "q8_0": ("llmc_gguf_matmul_q8_0", "LlmcGgufMatmulQ8_0")}
_PART_DTYPES = {"q4_1": (np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float16)),
                "q8_0": (np.dtype(np.int8), np.dtype(np.float16))}

_lock = threading.Lock()
_state: dict = {}  # "lib", "path", "reason" once tried


# ------------------------------------------------------------------------------------------ build & load

def cache_dir() -> Path:
    root = os.environ.get("LLMC_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "llmc"
    return base / "native"


def _compiler() -> str | None:
    return os.environ.get("CXX") if os.environ.get("CXX") and shutil.which(os.environ["CXX"]) else (
        shutil.which("g++") or shutil.which("c++"))


def _flags(include_dir: str) -> list[str]:
    flags = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=off", f"-I{include_dir}"]
    if os.environ.get("LLMC_NATIVE_NO_AVX512") == "1":
        flags.append("-mno-avx512f")
    return flags


def _build() -> Path:
    """Compile cpu_native.cc (once per source + flags + compiler) into the cache; returns the .so path."""
    import jax

    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (g++ / c++ not on PATH)")
    source = _SOURCE.read_bytes()
    flags = _flags(jax.ffi.include_dir())
    key = hashlib.sha256(source + "\0".join([cxx, *flags, jax.__version__]).encode()).hexdigest()[:16]
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    so = out_dir / f"cpu_native-{key}.so"
    if so.exists():
        return so
    with open(out_dir / f"cpu_native-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same file
        try:
            if so.exists():
                return so
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
            os.close(fd)
            try:
                proc = subprocess.run([cxx, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"compiling {_SOURCE.name} failed ({cxx}, exit {proc.returncode}):\n"
                                       f"{proc.stderr[-4000:]}")
                os.replace(tmp, so)  # atomic: readers see the whole file or none
                _prune(out_dir, keep=key)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return so


def _prune(out_dir: Path, keep: str, max_age_s: float = 86400.0) -> None:
    """Remove builds of other sources/flags not touched for a day (a loaded .so survives its unlinking)."""
    now = time.time()
    for f in out_dir.glob("cpu_native-*"):
        try:
            if keep not in f.name and now - f.stat().st_mtime > max_age_s:
                f.unlink()
        except OSError:
            pass


def _load() -> dict:
    with _lock:
        if _state:
            return _state
        try:
            import jax

            so = _build()
            lib = ctypes.CDLL(str(so))
            for target, symbol in _TARGETS.values():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
            _state.update(lib=lib, path=so, reason=None, avx512=bool(lib.LlmcGgufMatmulIsa()))
        except Exception as e:  # noqa: BLE001 - any failure means "not available", with its reason
            _state.update(lib=None, path=None, reason=f"{type(e).__name__}: {e}", avx512=False)
        return _state


def available() -> bool:
    """Whether the native kernels compiled, loaded and registered (builds them on first call)."""
    return _load()["lib"] is not None


def unavailable_reason() -> str | None:
    """Why available() is False (None when it is True)."""
    return _load()["reason"]


def uses_avx512() -> bool:
    """Whether the loaded build runs the AVX-512 kernels (False: the portable scalar path, or unavailable)."""
    return _load()["avx512"]


def pool_threads() -> int:
    """Threads XLA's intra-op pool reported to the last native call (-1: none yet or unavailable)."""
    lib = _load()["lib"]
    if lib is None:
        return -1
    fn = lib.LlmcGgufMatmulPoolThreads
    fn.restype = ctypes.c_int64
    return int(fn())


# ------------------------------------------------------------------------------------------ the op

def check_parts(x_shape, x_dtype, parts, fmt: str) -> tuple[int, int, int]:
    """Validate x [M, K] and the parts of `fmt` (shapes and dtypes); returns (M, N, K) or raises ValueError."""
    if fmt not in GGUF_FORMATS:
        raise ValueError(f"unknown GGUF format {fmt!r}; choose one of {', '.join(GGUF_FORMATS)}")
    names = WEIGHT_PARTS[fmt]
    if len(parts) != len(names):
        raise ValueError(f"{fmt} takes {len(names)} parts ({', '.join(names)}), got {len(parts)}")
    if len(x_shape) != 2:
        raise ValueError(f"gguf_matmul: x must be 2-D [M, K], got shape {tuple(x_shape)}")
    if np.dtype(x_dtype) != np.float32:
        raise ValueError(f"gguf_matmul: x must be float32, got {np.dtype(x_dtype)}")
    m, k = (int(v) for v in x_shape)
    if k % GGUF_BLOCK:
        raise ValueError(f"gguf_matmul: K = {k} is not a multiple of {GGUF_BLOCK}")
    q_shape = tuple(parts[0].shape)
    if len(q_shape) != 2:
        raise ValueError(f"gguf_matmul {fmt}: q must be 2-D [N, ...], got shape {q_shape}")
    n = int(q_shape[0])
    want = {"q": (n, k // 2 if fmt == "q4_1" else k), "d": (n, k // GGUF_BLOCK), "m": (n, k // GGUF_BLOCK)}
    for name, part, dtype in zip(names, parts, _PART_DTYPES[fmt]):
        if tuple(part.shape) != want[name]:
            raise ValueError(f"gguf_matmul {fmt}: part {name!r} has shape {tuple(part.shape)}, expected "
                             f"{want[name]} for x [M={m}, K={k}] and N={n}")
        if np.dtype(part.dtype) != dtype:
            raise ValueError(f"gguf_matmul {fmt}: part {name!r} must be {dtype}, got {np.dtype(part.dtype)}")
    return m, n, k


def gguf_matmul(x, *parts, format: str):  # noqa: A002 - the name the IR uses
    """y f32[M, N] = x f32[M, K] @ W^T with W[N, K] given as the GGUF parts of `format` (see module doc).

    Works eagerly and inside jax.jit (CPU only). Raises ValueError on bad shapes/dtypes, RuntimeError when
    the native kernels are unavailable.
    """
    import jax
    import jax.numpy as jnp

    m, n, _ = check_parts(x.shape, x.dtype, parts, format)
    if not available():
        raise RuntimeError(f"native GGUF matmul unavailable: {unavailable_reason()}")
    call = jax.ffi.ffi_call(_TARGETS[format][0], jax.ShapeDtypeStruct((m, n), jnp.float32),
                            vmap_method="sequential")
    return call(x, *parts)
