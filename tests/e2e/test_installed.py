"""The package as a user installs it: a wheel of this checkout in a clean virtual environment (no
editable link, nothing of the checkout on any path), and its `gpu-session` command run by its full
path from a folder outside the checkout, with a PATH that holds neither venv's bin (as pipx's shim
does): a whole rehearsal, `up --sim`, `chat --prompt`, `down --sim`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpu_session.stack.automation import pulumi_binary

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run(argv: list[str], timeout: int = 900, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The `gpu-session` command of a clean venv with this checkout's wheel and its `sim` extra."""
    folder = tmp_path_factory.mktemp("installed")
    # Built from the files git knows (tracked, and new ones it does not ignore), links kept: what a
    # clone holds, never a stale build/ of this checkout.
    source = folder / "source"
    listed = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT).stdout.split("\0")
    for name in filter(None, listed):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_symlink():
            (source / name).symlink_to(os.readlink(ROOT / name))
        elif (ROOT / name).is_file():
            shutil.copy2(ROOT / name, source / name)
    built = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source), "-w", str(folder / "dist")]
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = (folder / "dist").glob("gpu_session-*.whl")
    venv = folder / "venv"
    made = run([sys.executable, "-m", "venv", str(venv)])
    assert made.returncode == 0, made.stderr
    pip = run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", f"{wheel}[sim]"], timeout=1800)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv / "bin" / "gpu-session"


def test_an_installed_package_rehearses_a_whole_session_outside_the_checkout(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    drop = ("LAMBDA_", "RUNPOD_", "HF_", "GPU_SESSION_", "VIRTUAL_ENV", "PYTHON")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env |= {"PATH": f"{pulumi_binary().parent}:{SYSTEM_PATH}", "GPU_SESSION_SIM_DIR": str(tmp_path / "sim")}
    shown = "import gpu_session.paths as p; print(p.ASSETS, (p.ASSETS / 'roles').is_symlink())"
    where = run([str(installed.parent / "python"), "-c", shown], cwd=elsewhere, env=env)
    assets, linked = where.stdout.split()
    assert Path(assets).is_relative_to(installed.parent.parent) and linked == "False", where.stdout + where.stderr
    command = lambda *args: run([str(installed), *args], cwd=elsewhere, env=env)  # noqa: E731
    done = False
    try:
        up = command("up", "--sim", "--yes", "--backend", "transformers", "--stack", "installed")
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        assert "starting the cloud simulator" in up.stderr and "OpenAI-compatible endpoint: http://127.0.0.1:" in up.stderr

        chat = command("chat", "--stack", "installed", "--prompt", "Say hello", "--max-tokens", "8")
        assert chat.returncode == 0 and "tokens/s" in chat.stderr, chat.stderr[-3000:]

        bad = command("tunnel.start", "--stack", "never-up")
        assert (
            bad.returncode == 1
            and bad.stderr.strip() == "error: stack never-up is not up: `gpu-session up --stack never-up` first"
        )

        down = command("down", "--sim", "--stack", "installed")
        assert down.returncode == 0 and "stack installed: nothing left at the cloud" in down.stderr, down.stderr[-3000:]
        done = True
    finally:
        info = tmp_path / "sim" / "sim.json"
        if info.exists():
            if not done:  # a step above failed: leave nothing running
                command("down", "--sim", "--stack", "installed")
            os.kill(json.loads(info.read_text())["pid"], signal.SIGTERM)
            deadline = time.monotonic() + 60
            while info.exists() and time.monotonic() < deadline:
                time.sleep(0.5)
    assert not (Path(os.environ["XDG_STATE_HOME"]) / "gpu-session" / "stacks" / "installed").exists()
