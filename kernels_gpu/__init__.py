"""Triton GPU kernels for the cuda backend (leaf package: torch/triton imports only)."""
