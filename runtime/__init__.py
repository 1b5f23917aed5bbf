"""runtime: the serving side of llmc (engine, scheduler, sampler, CLI); `load` reads an exported artifact."""
from runtime.engine import Engine, RequestOutput
from runtime.sampler import SamplingParams
from runtime.step import StepInput

__all__ = ["Engine", "RequestOutput", "SamplingParams", "StepInput", "load"]


def load(path, **kwargs):
    """Load an artifact written by CompiledModel.export (see runtime.artifact)."""
    # NOTE: imported here so that `import runtime` stays light (the artifact loader pulls in the backends).
    from runtime.artifact import load as load_artifact

    return load_artifact(path, **kwargs)
