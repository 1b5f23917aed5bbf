"""Checkpoint loaders: GGUF, Hugging Face safetensors, orbax; and the named-model registry."""
from __future__ import annotations

from pathlib import Path

from lowering.checkpoints.base import Checkpoint, CheckpointError
from lowering.checkpoints.gguf_loader import GGUF_MAGIC, load_gguf
from lowering.checkpoints.orbax_io import (
    LLMC_CONFIG_FILE,
    load_orbax_dir,
    load_params,
    save_orbax_checkpoint,
    save_params,
)
from lowering.checkpoints.registry import MODELS, list_models, resolve_model
from lowering.checkpoints.safetensors_loader import load_hf_dir
from lowering.checkpoints.tokenizer import ChatTemplateError, Tokenizer

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ChatTemplateError",
    "Tokenizer",
    "load_checkpoint",
    "load_gguf",
    "load_hf_dir",
    "save_orbax_checkpoint",
    "load_orbax_dir",
    "save_params",
    "load_params",
    "resolve_model",
    "list_models",
]


def load_checkpoint(source: str | Path, *, progress: bool = True, keep_native: bool = False) -> Checkpoint:
    """Load a registered model name, a .gguf file, an llmc orbax directory or a Hugging Face directory.

    keep_native: a GGUF file's Q4_1 / Q8_0 tensors are also kept as stored (Checkpoint.native)."""
    if isinstance(source, str) and source in MODELS:
        return load_gguf(resolve_model(source), progress=progress, keep_native=keep_native)
    path = Path(source).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            is_gguf = f.read(4) == GGUF_MAGIC
        if is_gguf or path.suffix == ".gguf":
            return load_gguf(path, progress=progress, keep_native=keep_native)  # no magic: load_gguf's error
    elif path.is_dir():
        if (path / LLMC_CONFIG_FILE).is_file():
            return load_orbax_dir(path)
        if (path / "config.json").is_file():
            return load_hf_dir(path, progress=progress)
    elif not path.exists():
        raise CheckpointError(
            f"{source}: no such file or directory, and not a registered model name "
            f"(registered: {', '.join(sorted(MODELS))})"
        )
    raise CheckpointError(
        f"{source}: not a checkpoint llmc recognizes; expected a registered model name, a .gguf file, "
        f"a directory with {LLMC_CONFIG_FILE} (llmc orbax) or a Hugging Face directory with config.json"
    )
