"""Facts about how Triton runs here, shared by the kernel launchers."""
import triton

try:  # programmatic dependent launch (Hopper): griddepcontrol in the kernel, launch_pdl at the launch
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton
    gdc_launch_dependents = gdc_wait = None


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (Triton's CPU interpreter), where launchers pick fp32 dots and tiny tiles."""
    return triton.knobs.runtime.interpret if hasattr(triton, "knobs") else False


def tile_target(device) -> str:
    """The key of a kernel's tile table for tensors on `device`: "cuda", or "interpret" for the interpreter."""
    return "cuda" if device.type == "cuda" and not interpreting() else "interpret"
