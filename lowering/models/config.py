"""ModelConfig: the architecture hyper-parameters every loader produces and every model consumes."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe",
                           "phi3")
# Architectures whose MLPs are mixtures of experts (ModelConfig.num_experts > 0).
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")
LAYER_TYPES = ("full_attention", "sliding_attention")
HIDDEN_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # Hugging Face names: SiLU; GELU, tanh approximation


class ConfigError(ValueError):
    """A checkpoint's configuration is missing a field or asks for something llmc does not support."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer of the Llama family.

    `rope_scaling` follows Hugging Face's dict form, e.g.
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192}; None means plain RoPE. Phi-3's LongRoPE: {"rope_type":
    "longrope", "short_factor": [...], "long_factor": [...], "original_max_position_embeddings": 4096,
    "factor": 32.0} (optional "attention_factor"; see ops.RopeFrequencies for which set a token uses); any type
    may add "partial_rotary_factor" (< 1: only each head's first features rotate, Phi-4-mini).

    Mixture of experts (num_experts > 0; Mixtral, Qwen2-MoE, Qwen3-MoE): every layer's MLP is `num_experts`
    expert MLPs of width `moe_intermediate_size`, of which a router picks `num_experts_per_tok` per token
    (softmax over all experts, top-k, renormalised to sum to one when `norm_topk_prob`); weights
    mlp.gate.weight [E, D], mlp.experts.gate_up_proj [E, 2F, D], mlp.experts.down_proj [E, D, F].
    Qwen2-MoE adds a dense shared expert of width `shared_expert_intermediate_size` (mlp.shared_expert.*)
    scaled by sigmoid(mlp.shared_expert_gate.weight [1, D] . x). `intermediate_size` is then unused by the
    layers (HF keeps it for dense layers, which llmc does not mix in).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm of each query / key head before RoPE (Qwen3): self_attn.q_norm / k_norm [Dh]
    sliding_window: int | None = None
    num_experts: int = 0  # experts per MoE layer; 0 = dense MLPs
    num_experts_per_tok: int = 0  # top-k experts per token
    moe_intermediate_size: int = 0  # each expert's hidden width F
    norm_topk_prob: bool = False  # renormalise the top-k routing weights (Mixtral, Qwen3-MoE checkpoints: true)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert width; 0 = none
    # Per layer, "full_attention" or "sliding_attention" (a window of `sliding_window` keys); None: every layer
    # alike, windowed when sliding_window is set (Mistral). Gemma 3 interleaves the two kinds.
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3); None: rope_theta
    query_pre_attn_scalar: float | None = None  # attention scale = query_pre_attn_scalar**-0.5; None: head_dim
    hidden_activation: str = "silu"  # the gated MLP's activation: silu (SwiGLU) | gelu_pytorch_tanh (GeGLU)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {self.architecture!r}; llmc supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ConfigError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, tuple) or len(self.layer_types) != self.num_layers:
                raise ConfigError(f"layer_types must be a tuple of num_layers ({self.num_layers}) entries, "
                                  f"got {self.layer_types!r}")
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise ConfigError(f"unknown layer_types {unknown}; expected {', '.join(LAYER_TYPES)}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ConfigError("layer_types has sliding_attention layers but sliding_window is not set")
        if self.hidden_activation not in HIDDEN_ACTIVATIONS:
            raise ConfigError(f"hidden_activation {self.hidden_activation!r} is not supported; "
                              f"expected {', '.join(HIDDEN_ACTIVATIONS)}")
        if self.query_pre_attn_scalar is not None and not self.query_pre_attn_scalar > 0:
            raise ConfigError(f"query_pre_attn_scalar must be positive, got {self.query_pre_attn_scalar!r}")
        if self.architecture == "gemma3":
            if self.hidden_activation != "gelu_pytorch_tanh":
                raise ConfigError(f"gemma3 uses hidden_activation gelu_pytorch_tanh, got {self.hidden_activation!r}")
            if not self.qk_norm or self.attention_bias or self.num_experts:
                raise ConfigError("gemma3 has QK-norm (qk_norm=True), no attention bias and dense MLPs")
        else:
            gemma_only = {"layer_types": self.layer_types, "rope_local_theta": self.rope_local_theta,
                          "query_pre_attn_scalar": self.query_pre_attn_scalar}
            if self.hidden_activation != "silu":
                gemma_only["hidden_activation"] = self.hidden_activation
            set_fields = sorted(k for k, v in gemma_only.items() if v is not None)
            if set_fields:
                raise ConfigError(f"{', '.join(set_fields)} apply to gemma3 only, not {self.architecture}")
        self._check_experts()

    def _check_experts(self):
        if self.architecture in MOE_ARCHITECTURES and self.num_experts <= 0:
            raise ConfigError(f"{self.architecture} is a mixture of experts: num_experts must be positive, "
                              f"got {self.num_experts!r}")
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if not self.num_experts:
            if self.num_experts_per_tok or self.moe_intermediate_size or self.shared_expert_intermediate_size:
                raise ConfigError("num_experts_per_tok / moe_intermediate_size / shared_expert_intermediate_size "
                                  "need num_experts > 0 (a mixture of experts)")
            return
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                              f"got {self.num_experts_per_tok!r}")
        if self.moe_intermediate_size <= 0:
            raise ConfigError(f"moe_intermediate_size must be positive for a mixture of experts, "
                              f"got {self.moe_intermediate_size!r}")

    @property
    def is_moe(self) -> bool:
        """Whether every decoder layer's MLP is a mixture of experts."""
        return self.num_experts > 0

    def is_sliding(self, layer: int) -> bool:
        """Whether decoder layer `layer` attends through a sliding window of `sliding_window` keys."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        if self.layer_types is not None:
            d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields: {sorted(unknown)}")
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        if d.get("layer_types") is not None:
            d["layer_types"] = tuple(d["layer_types"])
        return cls(**d)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)
