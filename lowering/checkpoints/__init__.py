"""Checkpoint loaders: GGUF, Hugging Face safetensors, orbax; and the named-model registry."""
