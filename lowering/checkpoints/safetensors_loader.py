"""Load a Hugging Face model directory (config.json + safetensors, single or sharded) into a Checkpoint."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from lowering.checkpoints.base import Checkpoint, CheckpointError, check_weights, read_json_object
from lowering.checkpoints.tokenizer import Tokenizer
from lowering.models.config import ConfigError, ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

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

    # transformers v5 folds rope_theta and rope_scaling into one `rope_parameters` dict.
    rope = dict(cfg.get("rope_parameters") or {})
    rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    if not rope:
        rope = dict(cfg.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    rope_scaling = None if rope_type == "default" else {"rope_type": rope_type, **rope}

    sliding_window = None
    if model_type == "mistral":
        sliding_window = cfg.get("sliding_window")
    elif model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        sliding_window = cfg.get("sliding_window")
        layer_types = set(cfg.get("layer_types") or ())
        if len(layer_types) > 1:
            raise CheckpointError(
                f"{source}: sliding-window attention on only some layers (max_window_layers) is not supported"
            )

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
            attention_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            sliding_window=int(sliding_window) if sliding_window else None,
            bos_token_id=None if cfg.get("bos_token_id") is None else int(cfg["bos_token_id"]),
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e
    except KeyError as e:
        raise CheckpointError(f"{source}: config.json lacks required field {e.args[0]!r}") from e


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
    check_weights(config, weights, source)

    tokenizer = None
    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_hf_dir(directory, extra_eos_token_ids=config.eos_token_ids)
    return Checkpoint(config=config, weights=weights, tokenizer=tokenizer, source=source)
