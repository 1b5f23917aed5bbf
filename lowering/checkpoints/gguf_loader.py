"""Load a llama.cpp GGUF file into a Checkpoint: dequantized HF-named weights, ModelConfig, tokenizer."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from lowering.checkpoints.base import Checkpoint, CheckpointError, check_weights
from lowering.checkpoints.gguf_file import read_gguf
from lowering.checkpoints.tokenizer import Tokenizer
from lowering.models.config import ConfigError, ModelConfig
from lowering.quant import formats

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "gemma3")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma 3 blocks: QK-norm, and four norms a layer (llama.cpp's ffn_norm is the pre-feedforward one)
_GEMMA3_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")

# Gemma 3 in GGUF, where its metadata is silent: Hugging Face Gemma3TextConfig's defaults, which llama.cpp shares
GEMMA3_SLIDING_WINDOW_PATTERN = 6  # every 6th layer is global, the others sliding-window (local)
GEMMA3_ROPE_LOCAL_THETA = 10_000.0


def hf_tensor_name(gguf_name: str, architecture: str = "llama") -> str | None:
    """The Hugging Face name of a llama.cpp tensor, or None if llmc has no mapping for it."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    block_names = _GEMMA3_BLOCK_NAMES if architecture == "gemma3" else _BLOCK_NAMES
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in block_names:
        return f"model.layers.{m.group(1)}.{block_names[m.group(2)]}"
    return None


def permute_for_interleaved_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp order: within each head, rows [first half | second half] become interleaved.

    w: [num_heads * head_dim, ...]; per head, output row 2*j + s is input row s * head_dim/2 + j.
    """
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_from_interleaved_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of `permute_for_interleaved_rope`: llama.cpp q/k rows back to HF's rotate-half order.

    w: [num_heads * head_dim, ...]; per head, output row s * head_dim/2 + j is input row 2*j + s.
    """
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_metadata(reader) -> dict[str, Any]:
    """Every key/value of a gguf.GGUFReader as a plain Python value (str, int, float, bool or list); load_gguf
    reads them with lowering.checkpoints.gguf_file instead, in a fraction of the time."""
    return {key: field.contents() for key, field in reader.fields.items()}


def config_from_metadata(metadata: dict[str, Any], tensor_names: set[str], source: str) -> ModelConfig:
    """ModelConfig from `{arch}.*` metadata; tie_word_embeddings when there is no `output.weight` tensor."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{source}: GGUF architecture {arch!r} is not supported; llmc loads GGUF files of "
            f"architecture {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None, *, required: bool = False) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if required and value is None:
            raise CheckpointError(f"{source}: GGUF metadata key {arch}.{key} is missing; the file is incomplete")
        return value

    if get("expert_count", 0):
        raise CheckpointError(f"{source}: mixture-of-experts GGUF files ({arch}.expert_count) are not supported")
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(
            f"{source}: this GGUF stores Llama-3.1-style RoPE frequency factors (rope_freqs.weight), which "
            "llmc cannot yet map to a rope_scaling config; load the model's Hugging Face directory instead"
        )
    num_heads = int(get("attention.head_count", required=True))
    hidden_size = int(get("embedding_length", required=True))
    head_dim = int(get("attention.key_length") or hidden_size // num_heads)
    rope_dim = get("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise CheckpointError(
            f"{source}: partial rotary embeddings (rope.dimension_count {rope_dim} < head_dim {head_dim}) are not supported"
        )
    vocab_size = get("vocab_size") or len(metadata.get("tokenizer.ggml.tokens") or ())
    if not vocab_size:
        raise CheckpointError(f"{source}: cannot tell the vocabulary size ({arch}.vocab_size and the token list are missing)")

    rope_scaling = None
    scaling_type = get("rope.scaling.type")
    if scaling_type not in (None, "none"):
        rope_scaling = {"rope_type": scaling_type, "factor": float(get("rope.scaling.factor", 1.0))}
        if get("rope.scaling.original_context_length") is not None:
            rope_scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))

    def token_id(key: str) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return None if value is None else int(value)

    eos_ids = [token_id(k) for k in ("eos", "eot", "eom")]
    num_layers = int(get("block_count", required=True))
    extra = _gemma3_fields(get, num_layers, hidden_size, num_heads, head_dim) if arch == "gemma3" else {}
    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=int(vocab_size),
            hidden_size=hidden_size,
            intermediate_size=int(get("feed_forward_length", required=True)),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(get("attention.head_count_kv") or num_heads),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias=arch == "qwen2",
            bos_token_id=token_id("bos"),
            eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
            **extra,
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e


def _gemma3_fields(get, num_layers: int, hidden_size: int, num_heads: int, head_dim: int) -> dict[str, Any]:
    """ModelConfig fields of a Gemma 3 GGUF. Its metadata holds the window but not the layer pattern, the local
    RoPE base or the attention scale: those take Gemma3TextConfig's defaults, as transformers' GGUF loader does."""
    # NOTE: Gemma 3 27B scales queries by (hidden / heads)**-0.5 = 168**-0.5, the others by head_dim**-0.5; the
    # metadata does not say, so llama.cpp tells the 27B model by its shape, and so do we.
    is_27b = num_layers == 62 and hidden_size == 5376
    window = get("attention.sliding_window")
    return {
        "qk_norm": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": int(window) if window else None,
        "layer_types": tuple("full_attention" if (i + 1) % GEMMA3_SLIDING_WINDOW_PATTERN == 0 or not window
                             else "sliding_attention" for i in range(num_layers)),
        "rope_local_theta": GEMMA3_ROPE_LOCAL_THETA,
        "query_pre_attn_scalar": float(hidden_size // num_heads if is_27b else head_dim),
    }


def tensor_to_numpy(tensor) -> np.ndarray:
    """A GGUF tensor as a numpy array in HF axis order (ggml lists dims innermost first).

    F32 -> float32, F16 -> float16, BF16 -> bfloat16, every quantized type -> float32.
    """
    import gguf

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # [out, in] for a projection
    kind = tensor.tensor_type
    if kind == gguf.GGMLQuantizationType.F32:
        array = np.array(tensor.data, dtype=np.float32)
    elif kind == gguf.GGMLQuantizationType.F16:
        array = np.array(tensor.data, dtype=np.float16)
    elif kind == gguf.GGMLQuantizationType.BF16:
        array = np.array(tensor.data).view(np.uint16).view(ml_dtypes.bfloat16)
    else:
        try:
            array = gguf.quants.dequantize(tensor.data, kind)
        except NotImplementedError as e:
            raise CheckpointError(
                f"tensor {tensor.name}: GGUF type {kind.name} cannot be dequantized by the installed gguf "
                "package; upgrade gguf or re-quantize the model to a supported type (e.g. Q8_0, Q4_K)"
            ) from e
        array = np.asarray(array, dtype=np.float32)
    return array.reshape(shape)


def load_gguf(path: str | Path, *, progress: bool = True, keep_native: bool = False) -> Checkpoint:
    """Read a GGUF file: dequantize every tensor, rename to HF, undo llama.cpp's q/k row permutation.

    keep_native: also keep each 2-D Q4_1 / Q8_0 tensor as stored (Checkpoint.native; same row order)."""
    from tqdm import tqdm

    path = Path(path).expanduser().resolve()
    source = str(path)
    if not path.is_file():
        raise CheckpointError(f"{source}: no such file; pass the path of a .gguf model file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{source}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        metadata, tensors = read_gguf(path)
    except (ValueError, OSError) as e:  # GGUFFormatError, bad UTF-8, an unmappable file
        raise CheckpointError(
            f"{source}: cannot parse GGUF ({type(e).__name__}: {e}); the file is corrupt or truncated"
        ) from e

    tensor_names = {t.name for t in tensors}
    config = config_from_metadata(metadata, tensor_names, source)
    tokenizer = Tokenizer.from_gguf_metadata(metadata) if "tokenizer.ggml.model" in metadata else None
    # NOTE: llama.cpp's converter permutes q/k rows of "llama" models so its interleaved (GPT-J style)
    # RoPE matches HF's rotate-half; qwen2 keeps HF's order (llama.cpp runs it with NEOX RoPE).
    permuted_heads = (
        {"self_attn.q_proj": config.num_heads, "self_attn.k_proj": config.num_kv_heads}
        if config.architecture == "llama"
        else {}
    )

    weights: dict[str, np.ndarray] = {}
    native: dict[str, tuple[str, dict[str, np.ndarray]]] = {}
    show = progress and sys.stderr.isatty()
    for tensor in tqdm(tensors, desc=f"loading {path.name}", unit="tensor", disable=not show):
        name = hf_tensor_name(tensor.name, config.architecture)
        if name is None:
            raise CheckpointError(f"{source}: tensor {tensor.name} has no llmc mapping; this GGUF variant is not supported")
        try:
            array = tensor_to_numpy(tensor)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from e
        if config.architecture == "gemma3" and tensor.name.endswith("norm.weight"):
            # NOTE: llama.cpp stores Gemma's RMSNorm weights with the 1 of x * (1 + w) added; HF's (and llmc's)
            # weight is w, so subtract it back (transformers' GGUF loader does the same).
            array = array - np.float32(1.0)
        module = name.rsplit(".", 1)[0].split(".", 3)[-1]  # "self_attn.q_proj"
        if name.startswith("model.layers.") and module in permuted_heads:
            num_heads = permuted_heads[module]
            if array.shape[0] % (2 * num_heads):
                raise CheckpointError(
                    f"{source}: tensor {tensor.name} has {array.shape[0]} rows, not a multiple of 2 * {num_heads} heads"
                )
            array = unpermute_from_interleaved_rope(array, num_heads)
        weights[name] = array
        fmt = tensor.tensor_type.name.lower()
        if keep_native and fmt in formats.GGUF_FORMATS and array.ndim == 2:
            parts = formats.gguf_parts_from_blocks(fmt, np.asarray(tensor.data), array.shape)
            if name.startswith("model.layers.") and module in permuted_heads:  # the same row order as `array`
                parts = {k: unpermute_from_interleaved_rope(v, permuted_heads[module]) for k, v in parts.items()}
            native[name] = (fmt, parts)
    check_weights(config, weights, source)
    return Checkpoint(config=config, weights=weights, tokenizer=tokenizer, source=source, native=native)
