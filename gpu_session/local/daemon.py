"""The session's background helpers (the tunnel's supervisor, the watch): started detached from the
command that starts them, with a pid file in the stack's folder and a log under the state dir's
logs/ (kept after `down`, which deletes the stack's folder; logs hold no secret), stopped by
process group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gpu_session.paths import private_dir, stack_dir, state_dir, write_private


def _state(stack: str, name: str) -> Path:
    return stack_dir(stack, create=False) / f"{name}.json"


def alive(pid: int | None) -> bool:
    """A process that runs (a zombie, exited but not yet reaped, does not)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def state(stack: str, name: str) -> dict:
    path = _state(stack, name)
    return json.loads(path.read_text()) if path.exists() else {}


def update(stack: str, name: str, **values) -> None:
    write_private(_state(stack, name), json.dumps({**state(stack, name), **values}))


def running(stack: str, name: str) -> bool:
    return alive(state(stack, name).get("pid"))


def log_path(stack: str, name: str) -> Path:
    return private_dir(state_dir() / "logs") / f"{stack}-{name}.log"


def spawn(stack: str, name: str, module: str, *args: str, **values) -> subprocess.Popen:
    """`python -m module args` in its own session (it outlives the command), logging to <name>.log."""
    log = log_path(stack, name)
    write_private(log, "")
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)  # fmt: skip
    write_private(_state(stack, name), json.dumps({"pid": proc.pid, **values}))
    return proc


def stop(stack: str, name: str) -> bool:
    """Stop it and its children; True when it was running. A helper never stops itself."""
    path = _state(stack, name)
    if not path.exists():
        return False
    pid = state(stack, name).get("pid")
    if pid == os.getpid():
        return False
    was_running = alive(pid)
    if was_running:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    path.unlink(missing_ok=True)
    return was_running
