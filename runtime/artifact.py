"""runtime.load: rebuild a Program-ready model from an exported artifact, checking every file's hash.

Loading reads JSON, orbax arrays and tokenizer JSON only: nothing in an artifact is executed or
unpickled, and the graph may name only registered llmc ops and allow-listed lax primitives.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lowering.export import ARTIFACT_FORMAT, ARTIFACT_VERSION, hash_tree
from lowering.ir import Graph, IRError
from lowering.models.config import ModelConfig
from lowering.pipeline import CompileOptions
from lowering.program_source import ProgramSource


class ArtifactError(ValueError):
    """An artifact is missing, truncated, edited or from an incompatible version."""


@dataclasses.dataclass
class LoadedModel(ProgramSource):
    """What runtime.load returns: the same interface the Engine uses on a CompiledModel."""

    graph: Graph
    params: dict[str, np.ndarray]
    options: CompileOptions
    config: ModelConfig | None
    tokenizer: Any
    path: Path
    quant_report: dict | None = None  # the compile-time quantization plan and measured accuracy (manifest)

    @property
    def speculative(self):
        """The compile-time Speculative (lowering.passes), its draft / heads resolved inside the artifact; or None."""
        spec = self.options.speculation()
        if spec is None:
            return None
        from lowering.export import ARTIFACT_PREFIX

        changes = {}
        if isinstance(spec.draft, str) and spec.draft.startswith(ARTIFACT_PREFIX):
            changes["draft"] = load(self.path / spec.draft[len(ARTIFACT_PREFIX):])
        if isinstance(spec.heads, str) and spec.heads.startswith(ARTIFACT_PREFIX):
            changes["heads"] = str(self.path / spec.heads[len(ARTIFACT_PREFIX):])
        return dataclasses.replace(spec, **changes) if changes else spec


def load(path: str | os.PathLike, *, verify_hashes: bool = True) -> LoadedModel:
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not an llmc artifact (no manifest.json); create one with `llmc compile`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{manifest_path} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{manifest_path} is not an llmc artifact manifest")
    if manifest.get("version") != ARTIFACT_VERSION:
        raise ArtifactError(f"artifact version {manifest.get('version')!r} is not supported by this llmc "
                            f"(expects {ARTIFACT_VERSION}); re-export it")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise ArtifactError("manifest.json lists no files")
    if verify_hashes:
        actual = hash_tree(path)
        missing = sorted(set(listed) - set(actual))
        extra = sorted(set(actual) - set(listed))
        changed = sorted(k for k in set(listed) & set(actual) if listed[k] != actual[k])
        if missing or extra or changed:
            what = "; ".join(f"{label}: {', '.join(names[:3])}" for label, names in
                             (("missing", missing), ("unexpected", extra), ("modified or truncated", changed)) if names)
            raise ArtifactError(f"artifact {path} failed its integrity check ({what}); re-export it")
    try:
        graph = Graph.loads((path / "graph.json").read_text())
        options = CompileOptions.from_json(manifest["options"])
        config = ModelConfig.from_json(manifest["config"]) if manifest.get("config") else None
    except (IRError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"artifact {path} is invalid: {e}") from None

    from lowering.checkpoints import load_params

    params = load_params(path / "params")
    # a tensor-parallel graph types each rank's piece; the artifact stores whole params (meta: their shapes)
    full_shapes = (graph.meta.get("tensor_parallel") or {}).get("full_shapes", {})
    for name in graph.params:
        if name not in params:
            raise ArtifactError(f"artifact params lack {name!r}")
        want = graph.types[name]
        got = params[name]
        shape = tuple(full_shapes.get(name, want.shape))
        if tuple(got.shape) != shape or got.dtype.name != want.dtype:
            raise ArtifactError(f"param {name} is {got.dtype}{list(got.shape)} but the graph expects "
                                f"{want.dtype}{list(shape)}")
    tokenizer = None
    if manifest.get("has_tokenizer"):
        from lowering.checkpoints import Tokenizer

        tokenizer = Tokenizer.load(path / "tokenizer")
    return LoadedModel(graph, params, options, config, tokenizer, path, manifest.get("quantization"))
