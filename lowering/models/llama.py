"""The Llama family (Llama 2/3/3.1, SmolLM2, Mistral, Qwen2, Qwen3, Phi-3; the MoE Mixtral, Qwen2-MoE,
Qwen3-MoE) in Flax NNX, built from llmc's semantic ops."""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowering import ops
from lowering.models.config import ConfigError, ModelConfig
from lowering.models.nnx_params import dotted, with_params


class Linear(nnx.Module):
    """y = x @ weight.T (+ bias); weight is [out, in] as in Hugging Face checkpoints."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        scale = 1.0 / np.sqrt(in_features)
        self.weight = nnx.Param(jax.random.uniform(rngs.params(), (out_features, in_features), dtype, -scale, scale))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x):  # x: [T, in] -> [T, out]
        return ops.project(x, self.weight[...], None if self.bias is None else self.bias[...])


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):  # x: [T, D]
        return ops.rms_normalize(x, self.weight[...], self.eps)


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (vocab_size, dim), dtype) * 0.02)

    def __call__(self, token_ids):  # token_ids: i32[T] -> [T, D]
        return ops.embed_tokens(token_ids, self.weight[...])


class SelfAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, dh = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.q_proj = Linear(d, cfg.num_heads * dh, bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, cfg.num_kv_heads * dh, bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, cfg.num_kv_heads * dh, bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * dh, d, bias=False, dtype=dtype, rngs=rngs)
        if cfg.qk_norm:  # Qwen3: each head's query and key RMS-normalised (weights [Dh]) before RoPE
            self.q_norm = RMSNorm(dh, cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(dh, cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, x, positions, query_start):
        # x: [T, D]  positions: i32[T]  query_start: i32[S+1]  ->  [T, D]
        cfg = self.cfg
        rope = dict(head_dim=cfg.head_dim, theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling)
        q, k = self.q_proj(x), self.k_proj(x)
        if cfg.qk_norm:
            q = ops.head_rms_normalize(q, self.q_norm.weight[...], cfg.rms_norm_eps, cfg.head_dim)
            k = ops.head_rms_normalize(k, self.k_norm.weight[...], cfg.rms_norm_eps, cfg.head_dim)
        q = ops.apply_rope(q, positions, num_heads=cfg.num_heads, **rope)  # [T, Hq*Dh]
        k = ops.apply_rope(k, positions, num_heads=cfg.num_kv_heads, **rope)  # [T, Hkv*Dh]
        v = self.v_proj(x)  # [T, Hkv*Dh]
        # Mistral, Phi-3, Qwen2 with use_sliding_window: every layer sees only the last sliding_window keys
        o = ops.causal_attention(q, k, v, query_start, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                                 head_dim=cfg.head_dim, window=cfg.sliding_window)
        return self.o_proj(o)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):  # x: [T, D] -> [T, D]
        return self.down_proj(ops.silu_and_mul(self.gate_proj(x), self.up_proj(x)))


class Router(nnx.Module):
    """The MoE router: weight [E, D] scores each expert for a token (Hugging Face's mlp.gate)."""

    def __init__(self, num_experts: int, dim: int, *, dtype, rngs: nnx.Rngs):
        scale = 1.0 / np.sqrt(dim)
        self.weight = nnx.Param(jax.random.uniform(rngs.params(), (num_experts, dim), dtype, -scale, scale))


class Experts(nnx.Module):
    """E expert MLPs stacked: gate_up_proj [E, 2F, D] (gate rows, then up rows), down_proj [E, D, F]."""

    def __init__(self, num_experts: int, dim: int, width: int, *, dtype, rngs: nnx.Rngs):
        s_in, s_out = 1.0 / np.sqrt(dim), 1.0 / np.sqrt(width)
        self.gate_up_proj = nnx.Param(jax.random.uniform(rngs.params(), (num_experts, 2 * width, dim), dtype,
                                                         -s_in, s_in))
        self.down_proj = nnx.Param(jax.random.uniform(rngs.params(), (num_experts, dim, width), dtype, -s_out, s_out))


class SparseMoeBlock(nnx.Module):
    """Mixture-of-experts MLP (Mixtral, Qwen3-MoE; Qwen2-MoE with its sigmoid-gated shared expert): one moe op."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.gate = Router(cfg.num_experts, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, dtype=dtype, rngs=rngs)
        if cfg.shared_expert_intermediate_size:
            shared_cfg = dataclasses.replace(cfg, intermediate_size=cfg.shared_expert_intermediate_size)
            self.shared_expert = MLP(shared_cfg, dtype=dtype, rngs=rngs)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):  # x: [T, D] -> [T, D]
        cfg = self.cfg
        y = ops.mixture_of_experts(x, self.gate.weight[...], self.experts.gate_up_proj[...],
                                   self.experts.down_proj[...], top_k=cfg.num_experts_per_tok,
                                   norm_topk_prob=cfg.norm_topk_prob)
        if cfg.shared_expert_intermediate_size:
            y = y + jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # [T, 1] * [T, D]
        return y


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = SelfAttention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = SparseMoeBlock(cfg, dtype=dtype, rngs=rngs) if cfg.is_moe else MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, query_start):
        x = x + self.self_attn(self.input_layernorm(x), positions, query_start)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)


class LlamaForCausalLM(nnx.Module):
    """forward(token_ids i32[T], positions i32[T], query_start i32[S+1], logit_rows i32[L]) -> f32[L, V]."""

    body = LlamaBody  # the decoder stack (embed_tokens, layers, norm); a subclass may swap it (Gemma 3)

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.model = type(self).body(cfg, dtype=dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False,
                                                                    dtype=dtype, rngs=rngs)

    def hidden_states(self, token_ids, positions, query_start):
        """The final-norm hidden states f32[T, D] (the lm_head's input; the features draft heads read)."""
        x = self.model.embed_tokens(token_ids)  # [T, D]
        for layer in self.model.layers:
            x = layer(x, positions, query_start)
        return self.model.norm(x)

    def __call__(self, token_ids, positions, query_start, logit_rows):
        x = self.hidden_states(token_ids, positions, query_start)  # [T, D]
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return ops.compute_logits(x, logit_rows, head[...])  # f32[L, V]


def model_class(cfg: ModelConfig) -> type[nnx.Module]:
    """The Flax module of cfg's architecture: Gemma3ForCausalLM for gemma3, else LlamaForCausalLM."""
    if cfg.architecture == "gemma3":
        from lowering.models.gemma3 import Gemma3ForCausalLM

        return Gemma3ForCausalLM
    return LlamaForCausalLM


def build_model(cfg: ModelConfig, weights: Mapping[str, np.ndarray] | None = None, *, dtype=jnp.float32,
                seed: int = 0) -> nnx.Module:
    """A model of cfg's architecture (model_class) with the given HF-named weights (cast to dtype), or random
    weights when weights is None."""
    cls = model_class(cfg)
    if weights is None:
        return cls(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
    abstract = nnx.eval_shape(lambda: cls(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))
    expected = {dotted(path): var for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    extra = [e for e in sorted(set(weights) - set(expected) - ignorable) if not e.endswith("rotary_emb.inv_freq")]
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ConfigError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
    if extra:
        raise ConfigError(f"checkpoint has {len(extra)} tensors the {cfg.architecture} model does not use, e.g. {extra[:3]}")
    values = {}
    for name, var in expected.items():
        value = np.asarray(weights[name])
        if tuple(value.shape) != tuple(var.shape):
            raise ConfigError(f"tensor {name} has shape {value.shape}, the config implies {tuple(var.shape)}")
        values[name] = jnp.asarray(value, dtype=dtype)
    return nnx.merge(*with_params(abstract, values))


def random_model(cfg: ModelConfig, *, seed: int = 0, dtype=jnp.float32) -> nnx.Module:
    """A model of cfg's shape with random weights scaled so that its activations and greedy outputs vary from
    token to token (unit-variance embeddings, 1/sqrt(fan_in) matrices, norm weights near 1): for tests and
    benchmarks that compare token streams, which a near-zero-init model (build_model's) makes constant."""
    rng = np.random.default_rng(seed)
    abstract = nnx.eval_shape(lambda: model_class(cfg)(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))
    weights = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        name, shape = dotted(path), tuple(var.shape)
        if len(shape) == 1:
            w = 1.0 + 0.1 * rng.standard_normal(shape) if "norm" in name else 0.1 * rng.standard_normal(shape)
        elif "embed_tokens" in name:
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        weights[name] = w.astype(np.float32)
    return build_model(cfg, weights, dtype=dtype)
