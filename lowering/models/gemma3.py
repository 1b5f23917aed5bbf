"""Gemma 3 (text) in Flax NNX, built from llmc's semantic ops.

What sets it apart from the Llama family (lowering/models/llama.py), each as Hugging Face's Gemma3ForCausalLM does it:
  - embeddings times sqrt(hidden_size) (the scale rounded to the table's dtype);
  - RMSNorm weights are offsets from one: x / rms(x) * (1 + w), in float32;
  - four norms a layer ("sandwich"): input, post-attention, pre-feedforward, post-feedforward;
  - QK-norm on every query / key head before RoPE;
  - local layers attend through a sliding window with their own RoPE base (rope_local_theta), global layers
    attend to everything with rope_theta and rope_scaling (config.layer_types says which is which);
  - attention scale query_pre_attn_scalar**-0.5; GeGLU MLP (GELU, tanh approximation); tied embeddings.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from lowering import ops
from lowering.models.config import ModelConfig
from lowering.models.llama import Embedding, Linear, LlamaForCausalLM

NORM_WEIGHT_OFFSET = 1.0  # Gemma's RMSNorm multiplies by (1 + weight)


class GemmaRMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.zeros((dim,), dtype))  # zero: the identity scale (1 + 0)
        self.eps = eps

    def __call__(self, x):  # x: [T, D] -> [T, D]
        return ops.rms_normalize(x, self.weight[...], self.eps, weight_offset=NORM_WEIGHT_OFFSET)


class ScaledEmbedding(Embedding):
    def __init__(self, vocab_size: int, dim: int, *, dtype, rngs: nnx.Rngs):
        super().__init__(vocab_size, dim, dtype=dtype, rngs=rngs)
        self.scale = float(dim) ** 0.5

    def __call__(self, token_ids):  # token_ids: i32[T] -> [T, D]
        return ops.embed_tokens(token_ids, self.weight[...], scale=self.scale)


class Gemma3Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        d, dh = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.sliding = cfg.is_sliding(layer)
        self.q_proj = Linear(d, cfg.num_heads * dh, bias=False, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, cfg.num_kv_heads * dh, bias=False, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, cfg.num_kv_heads * dh, bias=False, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * dh, d, bias=False, dtype=dtype, rngs=rngs)
        self.q_norm = GemmaRMSNorm(dh, cfg.rms_norm_eps, dtype=dtype)
        self.k_norm = GemmaRMSNorm(dh, cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, x, positions, query_start):
        # x: [T, D]  positions: i32[T]  query_start: i32[S+1]  ->  [T, D]
        cfg = self.cfg
        if self.sliding:  # local layer: its own RoPE base, no scaling, a window of sliding_window keys
            theta = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
            rope = dict(head_dim=cfg.head_dim, theta=theta, rope_scaling=None)
            window = cfg.sliding_window
        else:
            rope = dict(head_dim=cfg.head_dim, theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling)
            window = None
        scalar = cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar is not None else cfg.head_dim
        norm = dict(eps=cfg.rms_norm_eps, head_dim=cfg.head_dim, weight_offset=NORM_WEIGHT_OFFSET)
        q = ops.head_rms_normalize(self.q_proj(x), self.q_norm.weight[...], **norm)  # [T, Hq*Dh]
        k = ops.head_rms_normalize(self.k_proj(x), self.k_norm.weight[...], **norm)  # [T, Hkv*Dh]
        v = self.v_proj(x)  # [T, Hkv*Dh]
        q = ops.apply_rope(q, positions, num_heads=cfg.num_heads, **rope)
        k = ops.apply_rope(k, positions, num_heads=cfg.num_kv_heads, **rope)
        o = ops.causal_attention(q, k, v, query_start, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                                 head_dim=cfg.head_dim, scale=float(scalar) ** -0.5, window=window)
        return self.o_proj(o)


class Gemma3MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):  # x: [T, D] -> [T, D]
        return self.down_proj(ops.gelu_tanh_and_mul(self.gate_proj(x), self.up_proj(x)))


class Gemma3DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(d, eps, dtype=dtype)
        self.self_attn = Gemma3Attention(cfg, layer, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = GemmaRMSNorm(d, eps, dtype=dtype)
        self.pre_feedforward_layernorm = GemmaRMSNorm(d, eps, dtype=dtype)
        self.mlp = Gemma3MLP(cfg, dtype=dtype, rngs=rngs)
        self.post_feedforward_layernorm = GemmaRMSNorm(d, eps, dtype=dtype)

    def __call__(self, x, positions, query_start):  # x: [T, D] -> [T, D]
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, query_start))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Body(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.embed_tokens = ScaledEmbedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Gemma3DecoderLayer(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)


class Gemma3ForCausalLM(LlamaForCausalLM):
    """forward(token_ids i32[T], positions i32[T], query_start i32[S+1], logit_rows i32[L]) -> f32[L, V].

    LlamaForCausalLM's forward over Gemma 3's decoder stack. The tied head reads the embedding table unscaled
    (the sqrt(hidden_size) scale applies to looked-up rows only)."""

    body = Gemma3Body
