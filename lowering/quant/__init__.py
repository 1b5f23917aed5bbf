"""Quantization: number formats (formats.py), the quantize_weights / quantize_kv passes, calibration,
GPTQ and the accuracy guard.

Import the submodules directly (lowering.ops imports formats, so this package stays import-light)."""
