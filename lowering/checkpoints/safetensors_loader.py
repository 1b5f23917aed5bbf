"""Load a Hugging Face model directory (config.json + safetensors, single or sharded) into a Checkpoint."""
from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from lowering.checkpoints.base import Checkpoint, CheckpointError, check_weights, read_json_object
from lowering.checkpoints.tokenizer import Tokenizer
from lowering.models.config import ConfigError, ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "phi3", "gemma3_text")

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file as a numpy array (bf16 as ml_dtypes.bfloat16).

    Layout: u64 little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
    then the raw little-endian tensor bytes, offsets relative to the end of the header.
    """
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if not 0 < header_len <= _MAX_HEADER_BYTES:
                raise ValueError(f"implausible header length {header_len}")
            header = json.loads(f.read(header_len))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)  # u8[num_data_bytes]
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); re-download or re-save it") from e
    if sys.byteorder != "little":
        raise CheckpointError(f"{path}: safetensors are little-endian and this machine is not")
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor {name} has dtype {info.get('dtype')}; llmc loads {', '.join(SAFETENSORS_DTYPES)}"
            )
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
        if end - begin != dtype.itemsize * int(np.prod(shape)) or end > data.size:
            raise CheckpointError(f"{path}: tensor {name} has inconsistent data offsets; the file is truncated or corrupt")
        # NOTE: copy out of the memory map so arrays are aligned, writable and outlive the open file.
        tensors[name] = np.array(data[begin:end]).view(dtype).reshape(shape)
    return tensors


def config_from_hf(cfg: dict[str, Any], source: str, generation_cfg: dict[str, Any] | None = None) -> ModelConfig:
    """ModelConfig from a Hugging Face `config.json` dict (transformers v4 or v5 layout)."""
    model_type = cfg.get("model_type")
    if model_type in ("gemma3_text", "gemma3"):
        return gemma3_config_from_hf(cfg, source, generation_cfg)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported; llmc loads {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {cfg.get('hidden_act')!r} is not supported (only silu)")
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias=true is not supported")
    if model_type != "qwen2" and cfg.get("attention_bias"):
        # NOTE: HF Llama's attention_bias also puts a bias on o_proj, which ModelConfig cannot express
        # (its attention_bias means q/k/v only, as in Qwen2).
        raise CheckpointError(f"{source}: attention_bias=true on a {model_type} model (bias on o_proj too) is not supported")

    rope_theta, rope_scaling = _rope_params(cfg, model_type, source)
    sliding_window = _sliding_window(cfg, model_type, source)

    def id_list(value: Any) -> list[int]:
        if value is None:
            return []
        return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]

    eos_ids = id_list(cfg.get("eos_token_id")) + id_list((generation_cfg or {}).get("eos_token_id"))
    num_heads = int(cfg["num_attention_heads"])
    try:
        return ModelConfig(
            architecture=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or (model_type == "qwen2_moe" and bool(cfg.get("qkv_bias", True))),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            **_moe_fields(cfg, model_type, source),
            sliding_window=int(sliding_window) if sliding_window else None,
            bos_token_id=None if cfg.get("bos_token_id") is None else int(cfg["bos_token_id"]),
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e
    except KeyError as e:
        raise CheckpointError(f"{source}: config.json lacks required field {e.args[0]!r}") from e


def _moe_fields(cfg: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields from an HF config (empty for dense model types)."""
    if model_type not in ("mixtral", "qwen2_moe", "qwen3_moe"):
        return {}
    if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
        raise CheckpointError(
            f"{source}: dense MLP layers between the MoE layers (decoder_sparse_step="
            f"{cfg.get('decoder_sparse_step')}, mlp_only_layers={cfg.get('mlp_only_layers')}) are not supported; "
            "llmc needs every layer to be a mixture of experts"
        )
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts (Mixtral's name), v4 as num_experts
    num_experts = cfg.get("num_local_experts") if model_type == "mixtral" else (
        cfg.get("num_experts") or cfg.get("num_local_experts"))
    if num_experts is None or cfg.get("num_experts_per_tok") is None:
        raise CheckpointError(f"{source}: config.json of a {model_type} model lacks its expert count "
                              "(num_local_experts / num_experts) or num_experts_per_tok")
    fields = {"num_experts": int(num_experts), "num_experts_per_tok": int(cfg["num_experts_per_tok"])}
    if model_type == "mixtral":  # Mixtral always renormalises; its experts have the dense width
        return {**fields, "moe_intermediate_size": int(cfg["intermediate_size"]), "norm_topk_prob": True}
    fields["moe_intermediate_size"] = int(cfg["moe_intermediate_size"])
    fields["norm_topk_prob"] = bool(cfg.get("norm_topk_prob", False))
    if model_type == "qwen2_moe":
        fields["shared_expert_intermediate_size"] = int(cfg["shared_expert_intermediate_size"])
    return fields


# Per-expert tensor names of saved checkpoints (what save_pretrained writes, in transformers 4 and 5):
# Mixtral model.layers.L.block_sparse_moe.experts.E.w1 / w3 / w2 (gate / up / down), Qwen-MoE
# model.layers.L.mlp.experts.E.gate_proj / up_proj / down_proj.
_EXPERT_TENSOR = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                            r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight")
_EXPERT_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def stack_expert_weights(weights: dict[str, np.ndarray], config: ModelConfig, source: str) -> dict[str, np.ndarray]:
    """Per-expert MoE tensors -> llmc's stacked ones: model.layers.L.mlp.experts.gate_up_proj [E, 2F, D] (each
    expert's gate rows, then its up rows) and .down_proj [E, D, F]; Mixtral's block_sparse_moe.* becomes mlp.*.
    Tensors already stacked (transformers 5's in-memory names) pass through."""
    out: dict[str, np.ndarray] = {}
    per_expert: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, array in weights.items():
        match = _EXPERT_TENSOR.fullmatch(name)
        if match:
            layer, expert, kind = int(match.group(1)), int(match.group(2)), match.group(3)
            per_expert.setdefault((layer, _EXPERT_ROLE[kind]), {})[expert] = array
        else:
            out[re.sub(r"^(model\.layers\.\d+)\.block_sparse_moe\.", r"\1.mlp.", name)] = array
    layers = sorted({layer for layer, _ in per_expert})
    for layer in layers:
        stacked = {}
        for role in ("gate", "up", "down"):
            found = per_expert.get((layer, role), {})
            missing = [e for e in range(config.num_experts) if e not in found]
            extra = sorted(set(found) - set(range(config.num_experts)))
            if missing or extra:
                problem = (f"lacks expert(s) {missing[:5]}" if missing
                           else f"has expert(s) {extra[:5]} beyond num_experts")
                raise CheckpointError(f"{source}: layer {layer}'s {role} projections {problem}; the config says "
                                      f"{config.num_experts} experts")
            shapes = {tuple(found[e].shape) for e in range(config.num_experts)}
            if len(shapes) != 1:
                raise CheckpointError(f"{source}: layer {layer}'s expert {role} projections differ in shape: "
                                      f"{sorted(shapes)}")
            stacked[role] = np.stack([found[e] for e in range(config.num_experts)])  # [E, F, D] or [E, D, F]
        prefix = f"model.layers.{layer}.mlp.experts"
        for name in (f"{prefix}.gate_up_proj", f"{prefix}.down_proj"):
            if name in out:
                raise CheckpointError(f"{source}: layer {layer} has its experts both stacked ({name}) and per expert")
        if stacked["gate"].shape != stacked["up"].shape:
            raise CheckpointError(f"{source}: layer {layer}'s expert gate and up projections differ in shape")
        out[f"{prefix}.gate_up_proj"] = np.concatenate([stacked["gate"], stacked["up"]], axis=1)
        out[f"{prefix}.down_proj"] = stacked["down"]
    return out


# Gemma3TextConfig's defaults (transformers), for fields a config.json may leave out.
_GEMMA3_DEFAULTS = {"head_dim": 256, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                    "sliding_window_pattern": 6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
                    "max_position_embeddings": 131_072, "hidden_activation": "gelu_pytorch_tanh"}


def gemma3_config_from_hf(cfg: dict[str, Any], source: str,
                          generation_cfg: dict[str, Any] | None = None) -> ModelConfig:
    """ModelConfig of a Gemma 3 text model (model_type gemma3_text, Gemma3ForCausalLM), v4 or v5 config layout."""
    if cfg.get("model_type") == "gemma3":
        raise CheckpointError(
            f"{source}: model_type 'gemma3' is the multimodal Gemma 3 (Gemma3ForConditionalGeneration, a vision tower "
            "and weights under model.language_model); llmc loads the text-only checkpoints of model_type gemma3_text "
            "(Gemma3ForCausalLM, e.g. gemma-3-270m or gemma-3-1b)"
        )

    def get(key: str) -> Any:
        value = cfg.get(key)
        return _GEMMA3_DEFAULTS.get(key) if value is None else value

    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise CheckpointError(f"{source}: {key}={cfg[key]} is not supported (Gemma 3 checkpoints leave it null)")
    if cfg.get("use_bidirectional_attention"):
        raise CheckpointError(f"{source}: use_bidirectional_attention=true (an encoder) is not supported")
    if cfg.get("attention_bias"):
        raise CheckpointError(f"{source}: attention_bias=true is not supported for gemma3_text")
    if get("hidden_activation") != "gelu_pytorch_tanh":
        raise CheckpointError(f"{source}: hidden_activation {get('hidden_activation')!r} is not supported for "
                              "gemma3_text (only gelu_pytorch_tanh)")

    # transformers v5: rope_parameters = {"full_attention": {...}, "sliding_attention": {...}};
    # v4: rope_theta, rope_local_base_freq and rope_scaling (global layers only).
    rope = cfg.get("rope_parameters") or {}
    full = dict(rope.get("full_attention") or {"rope_theta": get("rope_theta"), **(cfg.get("rope_scaling") or {})})
    local = dict(rope.get("sliding_attention") or {"rope_theta": get("rope_local_base_freq")})
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise CheckpointError(f"{source}: RoPE scaling on the sliding-window layers ({local}) is not supported")
    rope_theta = float(full.pop("rope_theta", _GEMMA3_DEFAULTS["rope_theta"]))
    full_type = full.pop("rope_type", full.pop("type", "default"))
    rope_scaling = None if full_type == "default" else {"rope_type": full_type, **full}

    layer_types = cfg.get("layer_types")
    if layer_types is None and "num_hidden_layers" in cfg:  # older configs: every pattern-th layer is global
        pattern = int(get("sliding_window_pattern"))
        layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                       for i in range(int(cfg["num_hidden_layers"]))]

    def id_list(value: Any) -> list[int]:
        if value is None:
            return []
        return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]

    eos_ids = id_list(cfg.get("eos_token_id")) + id_list((generation_cfg or {}).get("eos_token_id"))
    try:
        num_heads = int(cfg["num_attention_heads"])
        return ModelConfig(
            architecture="gemma3",
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(get("head_dim")),
            rms_norm_eps=float(get("rms_norm_eps")),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(get("max_position_embeddings")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            qk_norm=True,
            sliding_window=int(get("sliding_window")),
            layer_types=tuple(layer_types),
            rope_local_theta=float(local.get("rope_theta", _GEMMA3_DEFAULTS["rope_local_base_freq"])),
            query_pre_attn_scalar=float(get("query_pre_attn_scalar")),
            hidden_activation="gelu_pytorch_tanh",
            bos_token_id=None if cfg.get("bos_token_id") is None else int(cfg["bos_token_id"]),
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e
    except KeyError as e:
        raise CheckpointError(f"{source}: config.json lacks required field {e.args[0]!r}") from e


def _rope_params(cfg: dict[str, Any], model_type: str, source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) as ModelConfig holds them; rope_scaling also carries partial_rotary_factor
    (Phi-4-mini) and, for LongRoPE, always its original_max_position_embeddings and factor."""
    # transformers v5 folds rope_theta, partial_rotary_factor and rope_scaling into one `rope_parameters` dict.
    rope = dict(cfg.get("rope_parameters") or {})
    rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if not rope:
        rope = dict(cfg.get("rope_scaling") or {})
        partial = rope.pop("partial_rotary_factor", partial)
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if model_type == "phi3" and rope_type in ("su", "yarn"):  # Phi-3's early names for LongRoPE, as transformers
        rope_type = "longrope"
    if partial is None:
        partial = 1.0
    if partial != 1.0 and model_type != "phi3":
        raise CheckpointError(f"{source}: partial_rotary_factor={partial} on a {model_type} model is not supported "
                              "(only Phi-3 models rotate part of each head)")
    if rope_type == "longrope":
        for key in ("short_mscale", "long_mscale"):
            if key in rope:
                raise CheckpointError(f"{source}: longrope {key} is not supported (Hugging Face's phi3 has no "
                                      "per-set attention scale)")
        # NOTE: transformers gives a top-level original_max_position_embeddings priority (Phi3Config always has
        # one, 4096 by default) and derives a missing factor from max_position_embeddings.
        if model_type == "phi3" or "original_max_position_embeddings" in cfg:
            rope["original_max_position_embeddings"] = cfg.get("original_max_position_embeddings", 4096)
        rope.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        old_len = rope["original_max_position_embeddings"]
        if not isinstance(old_len, int) or old_len < 1:
            raise CheckpointError(f"{source}: longrope needs a positive original_max_position_embeddings, "
                                  f"got {old_len!r}")
        if rope.get("factor") is None:
            rope["factor"] = int(cfg.get("max_position_embeddings", 4096)) / old_len
    if rope_type == "default" and partial == 1.0:
        return rope_theta, None
    rope_scaling = {"rope_type": rope_type, **rope}
    if partial != 1.0:
        rope_scaling["partial_rotary_factor"] = float(partial)
    from lowering import ops

    num_heads = int(cfg.get("num_attention_heads") or 1)
    head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size") or 0) // num_heads)
    try:  # every rope lowering reads it through ops.rope_frequencies: refuse what it would refuse, now
        ops.rope_frequencies(head_dim, rope_theta, rope_scaling)
    except (ops.OpError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: rope scaling {rope_type!r}: {e}") from e
    return rope_theta, rope_scaling


def _sliding_window(cfg: dict[str, Any], model_type: str, source: str) -> int | None:
    """The window every attention layer uses (a query at position p sees keys at positions > p - window), or
    None; the defaults are transformers' (Mistral 4096 when config.json has no sliding_window)."""
    window = None
    if model_type == "mistral":
        window = cfg.get("sliding_window", 4096)
    elif model_type in ("mixtral", "phi3"):
        window = cfg.get("sliding_window")
    elif model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and cfg.get("use_sliding_window"):
        window = cfg.get("sliding_window")
        # layers max_window_layers.. slide (transformers' layer_types when config.json has none)
        first = int(cfg.get("max_window_layers", 28))
        num_layers = int(cfg.get("num_hidden_layers") or 0)
        layer_types = cfg.get("layer_types") or [
            "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        if window is None or set(layer_types) == {"full_attention"}:
            return None
        if set(layer_types) != {"sliding_attention"}:
            raise CheckpointError(
                f"{source}: sliding-window attention on only some layers (max_window_layers={first}, layer_types) "
                "is not supported"
            )
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise CheckpointError(f"{source}: sliding_window must be a positive integer or null, got {window!r}")
    return window


def _split_fused_projections(config: ModelConfig, weights: dict[str, np.ndarray], source: str) -> None:
    """Phi-3 stores q/k/v as one self_attn.qkv_proj [(Hq + 2 Hkv) Dh, D] and gate/up as one mlp.gate_up_proj
    [2F, D]: split them, in place, into the Llama names (the CUDA target fuses them again, fuse_projections)."""
    q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    fused = {"self_attn.qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj"), (q_dim, kv_dim, kv_dim)),
             "mlp.gate_up_proj": ("mlp", ("gate_proj", "up_proj"), (config.intermediate_size,) * 2)}
    for i in range(config.num_layers):
        for name, (module, parts, rows) in fused.items():
            key = f"model.layers.{i}.{name}.weight"
            if key not in weights:
                raise CheckpointError(f"{source}: missing tensor {key} (Phi-3 checkpoints store {name} fused)")
            tensor = weights.pop(key)  # [sum(rows), D]
            if tensor.ndim != 2 or tensor.shape[0] != sum(rows):
                raise CheckpointError(f"{source}: tensor {key} has shape {tuple(tensor.shape)}, expected "
                                      f"({sum(rows)}, {config.hidden_size}) from the config")
            for part, piece in zip(parts, np.split(tensor, np.cumsum(rows)[:-1], axis=0)):
                weights[f"model.layers.{i}.{module}.{part}.weight"] = piece
        if f"model.layers.{i}.self_attn.qkv_proj.bias" in weights:
            raise CheckpointError(f"{source}: a bias on Phi-3's qkv_proj is not supported")


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "a Hugging Face model file", "the file is missing or corrupt: re-download the model")


def _weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files to read, and the index's name -> file map when the model is sharded."""
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: has no weight_map; re-save the model")
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {index_path.name} is missing; download every shard")
        return files, weight_map
    single = directory / "model.safetensors"
    if single.is_file():
        return [single], None
    raise CheckpointError(
        f"{directory}: no model.safetensors or model.safetensors.index.json; save the model with "
        "save_pretrained(..., safe_serialization=True)"
    )


def load_hf_dir(path: str | Path, *, progress: bool = True) -> Checkpoint:
    """Read a Hugging Face directory: config.json, safetensors weights, tokenizer.json if present."""
    from tqdm import tqdm

    directory = Path(path).expanduser().resolve()
    source = str(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{source}: no config.json; expected a Hugging Face model directory")
    cfg = _read_json(config_path)
    generation_path = directory / "generation_config.json"
    generation_cfg = _read_json(generation_path) if generation_path.is_file() else None
    config = config_from_hf(cfg, source, generation_cfg)

    files, weight_map = _weight_files(directory)
    weights: dict[str, np.ndarray] = {}
    show = progress and sys.stderr.isatty()
    for f in tqdm(files, desc=f"loading {directory.name}", unit="file", disable=not show):
        for name, array in read_safetensors(f).items():
            # NOTE: old checkpoints carry RoPE's inv_freq buffer; it is derived from the config, not a weight.
            if name.endswith("rotary_emb.inv_freq"):
                continue
            weights[name] = array
    if weight_map is not None:
        missing = [name for name in weight_map if name not in weights and not name.endswith("rotary_emb.inv_freq")]
        if missing:
            raise CheckpointError(
                f"{source}: tensor {missing[0]} is listed in the index but absent from {weight_map[missing[0]]}"
            )
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # some exporters write the tied copy too
    if config.architecture == "phi3":
        _split_fused_projections(config, weights, source)
    if config.is_moe:
        weights = stack_expert_weights(weights, config, source)
    check_weights(config, weights, source)

    tokenizer = None
    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_hf_dir(directory, extra_eos_token_ids=config.eos_token_ids)
    return Checkpoint(config=config, weights=weights, tokenizer=tokenizer, source=source)
