"""runtime: the serving side of llmc (engine, scheduler, sampler, CLI); `load` reads an exported artifact."""
from runtime.engine import Engine, RequestOutput
from runtime.sampler import SamplingParams
from runtime.step import StepInput

__all__ = ["Engine", "RequestOutput", "SamplingParams", "StepInput", "is_artifact", "load", "load_if_artifact"]


def load(path, **kwargs):
    """Load an artifact written by CompiledModel.export (see runtime.artifact)."""
    # NOTE: imported here so that `import runtime` stays light (the artifact loader pulls in the backends).
    from runtime.artifact import load as load_artifact

    return load_artifact(path, **kwargs)


def is_artifact(source) -> bool:
    """Whether `source` is a directory written by CompiledModel.export (it holds manifest.json)."""
    import os

    return os.path.isfile(os.path.join(os.fspath(source), "manifest.json"))


def load_if_artifact(source, *, set_options=(), tensor_parallel: int = 1):
    """The model of an artifact directory, its graph sharded at load when tensor_parallel > 1; None when `source` is
    not an artifact (the caller compiles it). `set_options`: the compile options the caller was given, named as it
    names them; an artifact was compiled with its own, so any of them raises ValueError."""
    if not is_artifact(source):
        return None
    if set_options:
        raise ValueError(f"{source} is a compiled artifact: {', '.join(set_options)} "
                         f"{'applies' if len(set_options) == 1 else 'apply'} when compiling a checkpoint")
    model = load(source)
    return model if tensor_parallel == 1 else model.with_tensor_parallel(tensor_parallel)
