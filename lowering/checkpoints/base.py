"""Checkpoint: what every loader returns (config, HF-named numpy weights, tokenizer), and its error type."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lowering.models.config import ModelConfig

if TYPE_CHECKING:
    from lowering.checkpoints.tokenizer import Tokenizer


class CheckpointError(ValueError):
    """A checkpoint cannot be read: the message names the file or tensor and what to do about it."""


def read_json_object(path: Path, what: str, fix: str) -> dict[str, Any]:
    """The JSON object in `path`; a missing file, bad JSON or a non-object raises CheckpointError.

    `what` names the file's role ("the tokenizer config"), `fix` says what the user should do.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found ({what}); {fix}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); {fix}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object ({what})")
    return value


@dataclasses.dataclass
class Checkpoint:
    """A loaded model: weights use Hugging Face Llama names and layouts ([out, in] for projections).

    Arrays are numpy: float32 for dequantized or fp32 checkpoints, `ml_dtypes.bfloat16` or float16
    where the checkpoint stores those; the caller casts.
    """

    config: ModelConfig
    weights: dict[str, np.ndarray]
    tokenizer: Tokenizer | None
    source: str
    # GGUF tensors also kept as the file stores them (load_gguf(keep_native=True)): HF name -> (format, parts)
    # in lowering.quant.formats' GGUF formats, rows in HF order; `weights` still holds their float32 values.
    native: dict[str, tuple[str, dict[str, np.ndarray]]] = dataclasses.field(default_factory=dict)


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama-family checkpoint with this config must hold, with its HF shape."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q_dim = config.num_heads * config.head_dim
    kv_dim = config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (d,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (d,)
        if config.architecture == "gemma3":  # Gemma's sandwich norms around the MLP
            shapes[f"{p}.pre_feedforward_layernorm.weight"] = (d,)
            shapes[f"{p}.post_feedforward_layernorm.weight"] = (d,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (q_dim, d)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv_dim, d)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv_dim, d)
        shapes[f"{p}.self_attn.o_proj.weight"] = (d, q_dim)
        if config.qk_norm:
            shapes[f"{p}.self_attn.q_norm.weight"] = (config.head_dim,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (config.head_dim,)
        if config.attention_bias:
            shapes[f"{p}.self_attn.q_proj.bias"] = (q_dim,)
            shapes[f"{p}.self_attn.k_proj.bias"] = (kv_dim,)
            shapes[f"{p}.self_attn.v_proj.bias"] = (kv_dim,)
        if config.is_moe:
            shapes.update(_moe_weight_shapes(config, p))
            continue
        shapes[f"{p}.mlp.gate_proj.weight"] = (f, d)
        shapes[f"{p}.mlp.up_proj.weight"] = (f, d)
        shapes[f"{p}.mlp.down_proj.weight"] = (d, f)
    return shapes


def _moe_weight_shapes(config: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    """A mixture-of-experts MLP's tensors in layer prefix `p` (experts stacked, as transformers 5 holds them)."""
    d, e = config.hidden_size, config.num_experts
    fe, fs = config.moe_intermediate_size, config.shared_expert_intermediate_size
    shapes = {f"{p}.mlp.gate.weight": (e, d), f"{p}.mlp.experts.gate_up_proj": (e, 2 * fe, d),
              f"{p}.mlp.experts.down_proj": (e, d, fe)}
    if fs:
        shared = f"{p}.mlp.shared_expert"
        shapes.update({f"{shared}.gate_proj.weight": (fs, d), f"{shared}.up_proj.weight": (fs, d),
                       f"{shared}.down_proj.weight": (d, fs), f"{shared}_gate.weight": (1, d)})
    return shapes


def check_weights(config: ModelConfig, weights: dict[str, np.ndarray], source: str) -> None:
    """Raise CheckpointError unless `weights` holds exactly the tensors `config` needs, shaped right."""
    expected = expected_weight_shapes(config)
    missing = [name for name in expected if name not in weights]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{source}: missing tensor(s) {', '.join(missing[:5])}{more}; the checkpoint is incomplete "
            "or its config does not match its weights"
        )
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"{source}: unexpected tensor(s) {', '.join(unexpected[:5])}{more}; this looks like an "
            "architecture variant llmc does not support"
        )
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(weights[name].shape)}, expected {shape} from the "
                "config; the config and the weights disagree"
            )
