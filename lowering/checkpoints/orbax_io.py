"""Save and load flat parameter dicts with orbax (no pickle), and whole Checkpoints as llmc orbax directories.

An llmc orbax directory:
    llmc_config.json      {"format": "llmc-orbax", "version": 1, "config": ModelConfig.to_json(), "source": ...}
    params/               orbax StandardCheckpointer tree of {escaped name: array}
    tokenizer/            tokenizer.json + llmc_tokenizer.json (absent when the checkpoint has none)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from lowering.checkpoints.base import Checkpoint, CheckpointError, check_weights, read_json_object
from lowering.checkpoints.tokenizer import Tokenizer
from lowering.models.config import ConfigError, ModelConfig

LLMC_CONFIG_FILE = "llmc_config.json"
LLMC_ORBAX_FORMAT = "llmc-orbax"
LLMC_ORBAX_VERSION = 1
_SAFE_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def escape_key(key: str) -> str:
    """A parameter name as an orbax-safe key: bytes outside [A-Za-z0-9_-] become %XX (so '.' -> '%2E')."""
    return "".join(chr(b) if b in _SAFE_BYTES else f"%{b:02X}" for b in key.encode("utf-8"))


def unescape_key(key: str) -> str:
    """Inverse of `escape_key`."""
    out = bytearray()
    i = 0
    while i < len(key):
        if key[i] == "%":
            out.append(int(key[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(key[i]))
            i += 1
    return out.decode("utf-8")


def save_params(path: str | Path, params: dict[str, np.ndarray], *, overwrite: bool = False) -> None:
    """Write `params` (flat name -> array) as an orbax checkpoint at `path`; dtypes are kept exactly."""
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().resolve()
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists; remove it or pass overwrite=True")
    if not params:
        raise CheckpointError(f"{path}: refusing to save an empty parameter dict")
    tree: dict[str, np.ndarray] = {}
    for name, value in params.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"parameter names must be non-empty strings, got {name!r}")
        array = np.asarray(value)
        if array.size == 0:
            raise CheckpointError(f"parameter {name} has zero elements {array.shape}; orbax cannot store empty arrays")
        tree[escape_key(name)] = array
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(path, tree, force=overwrite)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()


def load_params(path: str | Path) -> dict[str, np.ndarray]:
    """Read what `save_params` wrote: name -> numpy array, names and dtypes exactly as saved."""
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such orbax checkpoint directory")
    metadata_file = path / "_METADATA"
    try:
        json.loads(metadata_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{metadata_file}: missing or not valid JSON ({e}); the orbax checkpoint is incomplete or corrupt, re-export it"
        ) from e
    checkpointer = ocp.StandardCheckpointer()
    try:
        # NOTE: leaves saved as numpy arrays restore as numpy arrays in their saved dtype.
        restored = checkpointer.restore(path)
    except Exception as e:  # orbax/tensorstore raise many types on missing or damaged files
        detail = str(e) if len(str(e)) <= 300 else str(e)[:300] + "..."
        raise CheckpointError(
            f"{path}: cannot restore the orbax checkpoint ({type(e).__name__}: {detail}); "
            "it is corrupt or incomplete, re-export it"
        ) from e
    finally:
        checkpointer.close()
    return {unescape_key(key): np.asarray(value) for key, value in restored.items()}


def save_orbax_checkpoint(ckpt: Checkpoint, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write `ckpt` as an llmc orbax directory (config JSON, params, tokenizer); returns the path."""
    path = Path(path).expanduser().resolve()
    if path.exists():
        if not overwrite:
            raise CheckpointError(f"{path}: already exists; remove it or pass overwrite=True")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    save_params(path / "params", ckpt.weights)
    if ckpt.tokenizer is not None:
        ckpt.tokenizer.save(path / "tokenizer")
    meta = {
        "format": LLMC_ORBAX_FORMAT,
        "version": LLMC_ORBAX_VERSION,
        "config": ckpt.config.to_json(),
        "source": ckpt.source,
    }
    # NOTE: the config is written last, so a directory with llmc_config.json is a complete one.
    (path / LLMC_CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def load_orbax_dir(path: str | Path) -> Checkpoint:
    """Read an llmc orbax directory written by `save_orbax_checkpoint`."""
    path = Path(path).expanduser().resolve()
    meta = _read_config(path / LLMC_CONFIG_FILE)
    try:
        config = ModelConfig.from_json(meta["config"])
    except (ConfigError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path / LLMC_CONFIG_FILE}: invalid model config ({e})") from e
    weights = load_params(path / "params")
    check_weights(config, weights, str(path))
    tokenizer = Tokenizer.load(path / "tokenizer") if (path / "tokenizer").is_dir() else None
    return Checkpoint(config=config, weights=weights, tokenizer=tokenizer, source=str(path))


def _read_config(config_path: Path) -> dict[str, Any]:
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: not found; expected an llmc orbax directory (save_orbax_checkpoint)")
    meta = read_json_object(config_path, "an llmc orbax directory's config, see save_orbax_checkpoint",
                            "re-export the checkpoint")
    if meta.get("format") != LLMC_ORBAX_FORMAT:
        raise CheckpointError(f"{config_path}: not an llmc orbax config (format must be {LLMC_ORBAX_FORMAT!r})")
    if meta.get("version") != LLMC_ORBAX_VERSION:
        raise CheckpointError(
            f"{config_path}: version {meta.get('version')!r}, this llmc reads version {LLMC_ORBAX_VERSION}; re-export it"
        )
    return meta
