"""Model definitions in Flax NNX, written with llmc's semantic ops so tracing keeps them whole."""
from lowering.models.config import ModelConfig

__all__ = ["ModelConfig"]
