"""Builders for tiny synthetic checkpoints: a byte-level BPE vocabulary, HF-named Llama weights, GGUF files."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest

from lowering.checkpoints.tokenizer import byte_to_unicode

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o u", "Ġ s", "l l", "Ġ w", "Ġ Ġ", "ĠĠ ĠĠ"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token_types): 3 control tokens, the 256 byte symbols, one token per merge."""
    symbols = [byte_to_unicode()[b] for b in range(256)]
    merged = [m.replace(" ", "") for m in MERGES]
    tokens = SPECIAL_TOKENS + symbols + merged
    token_types = [3] * len(SPECIAL_TOKENS) + [1] * (len(symbols) + len(merged))
    return tokens, list(MERGES), token_types


def gemma_vocab() -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token_types) of a tiny Gemma-style SentencePiece vocabulary as a GGUF stores it: control
    tokens, user-defined newline runs and space runs (spelled with real spaces), the 256 byte tokens, then pieces
    whose order (not their scores) ranks the merges: "ab" comes before "ca", so "cab" becomes c + ab."""
    control = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    user = ["\n", "\n\n", "  ", "   "]
    pieces = ["\u2581", "a", "b", "c", "d", "bc", "ab", "\u2581a", "abc", "\u2581ab", "\u2581abc", "ca", "da",
              "\u2581\u2581\u2581\u2581", "\u2581d"]
    tokens = control + user + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [3] * len(control) + [4] * len(user) + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * (len(control) + len(user) + 256) + [float(-i) for i in range(len(pieces))][::-1]  # reversed
    return tokens, scores, types


@dataclasses.dataclass
class TinyLlama:
    """Hyper-parameters of the synthetic model; sizes are multiples of 32 so Q4/Q8 blocks fit."""

    vocab_size: int = len(tiny_vocab()[0])
    hidden_size: int = 64
    intermediate_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    context_length: int = 512
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def make_hf_weights(cfg: TinyLlama, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under Hugging Face Llama names and [out, in] layouts."""
    rng = np.random.default_rng(seed)
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    w = {"model.embed_tokens.weight": rand(v, d), "model.norm.weight": rand(d)}
    if not cfg.tie_word_embeddings:
        w["lm_head.weight"] = rand(v, d)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        w |= {
            f"{p}.input_layernorm.weight": rand(d),
            f"{p}.post_attention_layernorm.weight": rand(d),
            f"{p}.self_attn.q_proj.weight": rand(q, d),
            f"{p}.self_attn.k_proj.weight": rand(kv, d),
            f"{p}.self_attn.v_proj.weight": rand(kv, d),
            f"{p}.self_attn.o_proj.weight": rand(d, q),
            f"{p}.mlp.gate_proj.weight": rand(f, d),
            f"{p}.mlp.up_proj.weight": rand(f, d),
            f"{p}.mlp.down_proj.weight": rand(d, f),
        }
        if cfg.attention_bias:
            w |= {
                f"{p}.self_attn.q_proj.bias": rand(q),
                f"{p}.self_attn.k_proj.bias": rand(kv),
                f"{p}.self_attn.v_proj.bias": rand(kv),
            }
    return w


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows, written as an explicit row gather.

    Per head of `head_dim` rows: new row 2*j + s takes old row s*head_dim/2 + j (halves interleaved).
    """
    head_dim = w.shape[0] // num_heads
    rows = [h * head_dim + s * (head_dim // 2) + j for h in range(num_heads) for j in range(head_dim // 2) for s in range(2)]
    return w[rows]


def llama_cpp_unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    head_dim = w.shape[0] // num_heads
    rows = [h * head_dim + s * (head_dim // 2) + j for h in range(num_heads) for j in range(head_dim // 2) for s in range(2)]
    out = np.empty_like(w)
    out[rows] = w
    return out


_GGUF_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_GGUF_BLOCK[rest]}"


def write_gguf(
    path: Path,
    cfg: TinyLlama,
    weights: dict[str, np.ndarray],
    *,
    arch: str = "llama",
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    pre: str = "gpt2",
    tokenizer_model: str | None = "gpt2",
    add_bos_token: bool = False,
    extra_tensors: dict[str, np.ndarray] | None = None,
    drop: tuple[str, ...] = (),
    metadata: dict[str, object] | None = None,
) -> dict[str, np.ndarray]:
    """Write `weights` (HF names/layout) as a GGUF the way llama.cpp's converter would.

    2-D tensors are stored as `qtype`, 1-D ones as F32; q/k rows are permuted for arch "llama".
    Returns what an exact loader must give back: the HF weights after the storage round trip.
    """
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    if tokenizer_model is not None:
        tokens, merges, token_types = tiny_vocab()
        writer.add_tokenizer_model(tokenizer_model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_pad_token_id(0)
        writer.add_add_bos_token(add_bos_token)
        writer.add_chat_template(CHAT_TEMPLATE)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, int(value))

    expected = {}
    for name, w in weights.items():
        if name in drop:
            continue
        stored = w
        heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}.get(name.split(".")[-2])
        if arch == "llama" and heads is not None:
            stored = llama_cpp_permute(w, heads)
        if w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            packed = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(gguf_name(name), packed, raw_dtype=qtype)
            restored = gguf.quants.dequantize(packed, qtype).reshape(stored.shape)
            if qtype == gguf.GGMLQuantizationType.F16:
                restored = packed
            elif qtype == gguf.GGMLQuantizationType.BF16:
                import ml_dtypes

                restored = packed.view(np.uint16).view(ml_dtypes.bfloat16).reshape(stored.shape)
        else:
            writer.add_tensor(gguf_name(name), stored)
            restored = stored
        if arch == "llama" and heads is not None:
            restored = llama_cpp_unpermute(restored, heads)
        expected[name] = restored
    for name, w in (extra_tensors or {}).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture
def tiny_gguf(tmp_path):
    """(path, cfg, hf_weights, expected): a 2-layer F32 Llama GGUF with the tiny BPE vocabulary."""
    cfg = TinyLlama()
    weights = make_hf_weights(cfg)
    path = tmp_path / "tiny.gguf"
    expected = write_gguf(path, cfg, weights)
    return path, cfg, weights, expected


@pytest.fixture
def ckb():
    """The builders above, for test modules (conftest files are not importable by name)."""
    import types

    return types.SimpleNamespace(
        TinyLlama=TinyLlama,
        make_hf_weights=make_hf_weights,
        write_gguf=write_gguf,
        tiny_vocab=tiny_vocab,
        gemma_vocab=gemma_vocab,
        llama_cpp_permute=llama_cpp_permute,
        llama_cpp_unpermute=llama_cpp_unpermute,
        gguf_name=gguf_name,
        CHAT_TEMPLATE=CHAT_TEMPLATE,
        SPECIAL_TOKENS=SPECIAL_TOKENS,
    )
