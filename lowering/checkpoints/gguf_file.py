"""Read a GGUF file's metadata and tensor table straight from a memory map.

The gguf package's GGUFReader builds a numpy view for every element of every metadata array, which takes ~20 s
for a 262,144-token vocabulary (Gemma 3); this reads the same values in a fraction of a second. Tensor data
stays memory-mapped, shaped as GGUFReader shapes it (quantized types as raw block bytes per row).

Layout (little-endian, GGUF v2 / v3):
  "GGUF"  u32 version  u64 tensor_count  u64 kv_count
  kv_count x   key: string, value type: u32, value
  tensor_count x   name: string, n_dims: u32, dims: u64[n_dims] (innermost first), ggml type: u32, offset: u64
  padding to general.alignment (default 32), then the tensor data; each offset is relative to its start
A string is u64 byte length + UTF-8 bytes; an array is element type: u32, count: u64, then the elements.
"""
from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF value types: (struct format, size) of the scalar ones; 8 is a string, 9 an array.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The bytes are not a well-formed GGUF file (the message says where)."""


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray  # u64[n_dims], innermost first (ggml order)
    data: np.ndarray  # memory-mapped; F32/F16/...: [outer, ..., inner] elements; quantized: u8[rows..., row bytes]


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, size: int) -> memoryview:
        end = self.pos + size
        if size < 0 or end > len(self.buf):
            raise GGUFFormatError(f"unexpected end of file at byte {self.pos} (wanted {size} more bytes)")
        view, self.pos = self.buf[self.pos:end], end
        return view

    def scalar(self, kind: int) -> Any:
        fmt, size = _SCALARS[kind]
        return struct.unpack_from(fmt, self.take(size))[0]

    def string(self) -> str:
        return str(self.take(self.scalar(10)), "utf-8")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(kind)
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise GGUFFormatError(f"unknown GGUF value type {kind} at byte {self.pos}")
        item_kind, count = self.scalar(4), self.scalar(10)
        if item_kind in _NUMPY:
            dtype = np.dtype(_NUMPY[item_kind])
            return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
        return [self.value(item_kind) for _ in range(count)]


def read_gguf(path: str | Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """(metadata, tensors) of a GGUF file: every key/value as a plain Python value (str, int, float, bool, list),
    with GGUF.version / GGUF.tensor_count / GGUF.kv_count as GGUFReader reports them; the tensors in file order.

    Raises GGUFFormatError (a ValueError) on a malformed or truncated file."""
    import gguf

    mapped = np.memmap(path, dtype=np.uint8, mode="r")  # u8[file bytes]
    cur = _Cursor(memoryview(mapped))
    if bytes(cur.take(4)) != GGUF_MAGIC:
        raise GGUFFormatError("GGUF magic missing")
    version = cur.scalar(4)
    if version not in SUPPORTED_VERSIONS:
        kind = "a big-endian file" if version & 0xFFFF == 0 else f"version {version}"
        versions = "/".join(f"v{v}" for v in SUPPORTED_VERSIONS)
        raise GGUFFormatError(f"{kind} is not supported (llmc reads little-endian GGUF {versions})")
    num_tensors, num_kv = cur.scalar(10), cur.scalar(10)
    metadata: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": num_tensors, "GGUF.kv_count": num_kv}
    for _ in range(num_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar(4))

    infos = []
    for _ in range(num_tensors):
        name = cur.string()
        dims = np.array([cur.scalar(10) for _ in range(cur.scalar(4))], dtype=np.uint64)
        infos.append((name, dims, cur.scalar(4), cur.scalar(10)))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFFormatError(f"general.alignment must be a power of two, got {alignment!r}")
    data_start = -(-cur.pos // alignment) * alignment

    tensors, seen = [], set()
    for name, dims, raw_type, offset in infos:
        if name in seen:
            raise GGUFFormatError(f"tensor {name} appears twice")
        seen.add(name)
        try:
            kind = gguf.GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFFormatError(f"tensor {name} has unknown ggml type {raw_type}") from None
        block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
        num_elements = int(np.prod(dims, dtype=np.int64))
        num_bytes = num_elements * type_size // block_size
        start = data_start + int(offset)
        if start + num_bytes > mapped.size:
            raise GGUFFormatError(f"tensor {name} runs past the end of the file")
        shape = tuple(int(d) for d in reversed(dims.tolist()))  # outermost first
        plain = _PLAIN_TYPES.get(kind.name)
        if plain is not None:
            data = mapped[start:start + num_bytes].view(plain).reshape(shape)
        else:
            data = mapped[start:start + num_bytes].reshape(gguf.quants.quant_shape_to_byte_shape(shape, kind))
        tensors.append(GGUFTensor(name, kind, dims, data))
    return metadata, tensors


# ggml types GGUFReader hands out as elements (everything else, BF16 included, as raw bytes per row)
_PLAIN_TYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8"), "I8": np.dtype("i1"),
                "I16": np.dtype("<i2"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8")}
