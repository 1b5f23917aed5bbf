"""Export a CompiledModel as an artifact directory: manifest.json, graph.json, params/, tokenizer/."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

ARTIFACT_FORMAT = "llmc.artifact"
ARTIFACT_VERSION = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(root: Path) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} for every file under root except manifest.json."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != "manifest.json":
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def export_artifact(cm, path: Path) -> Path:
    import jax

    from lowering.checkpoints import save_params

    path = Path(path).absolute()
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / "manifest.json").exists())):
        raise FileExistsError(f"{path} exists and is not an llmc artifact; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / "graph.json").write_text(cm.graph.dumps())
        save_params(tmp / "params", cm.params)
        if cm.tokenizer is not None:
            cm.tokenizer.save(tmp / "tokenizer")
        options = cm.options.to_json()
        if options.get("speculative") is not None:
            options["speculative"] = _export_speculation(getattr(cm, "speculative", None), options["speculative"], tmp)
        manifest = {
            "format": ARTIFACT_FORMAT,
            "version": ARTIFACT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"llmc": _llmc_version(), "jax": jax.__version__},
            "target": cm.target,
            "options": options,
            "config": cm.config.to_json() if cm.config is not None else None,
            "params": {k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in cm.params.items()},
            "has_tokenizer": cm.tokenizer is not None,
            "quantization": cm.quant_report.to_json() if cm.quant_report is not None else None,
            "files": hash_tree(tmp),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


ARTIFACT_PREFIX = "artifact:"  # a speculative draft / heads path inside the artifact directory


def _export_speculation(spec, data: dict, tmp: Path) -> dict:
    """Write what speculation needs into the artifact: a draft model object as the nested artifact `draft/`,
    trained heads as `spec_heads/`; their options then name them as "artifact:<dir>"."""
    data = dict(data)
    draft = getattr(spec, "draft", None)
    if draft is not None and not isinstance(draft, (str, os.PathLike)):
        if hasattr(draft, "export"):  # a CompiledModel
            draft.export(tmp / "draft")
        elif hasattr(draft, "path") and (Path(draft.path) / "manifest.json").is_file():  # a loaded artifact
            shutil.copytree(draft.path, tmp / "draft")
        else:
            raise ValueError(f"cannot export the speculative draft model (a {type(draft).__name__}): pass a compiled "
                             "model, a loaded artifact or a checkpoint path")
        data["draft"] = ARTIFACT_PREFIX + "draft"
    if data.get("heads") is not None and not str(data["heads"]).startswith(ARTIFACT_PREFIX):
        heads = Path(data["heads"])
        if not heads.is_dir():
            raise FileNotFoundError(f"speculative heads directory {heads} does not exist")
        shutil.copytree(heads, tmp / "spec_heads")
        data["heads"] = ARTIFACT_PREFIX + "spec_heads"
    return data


def _llmc_version() -> str:
    try:
        from importlib.metadata import version

        return version("llmc")
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return "0+unknown"
