"""The tunnel: 127.0.0.1:PORT here → 127.0.0.1:8000 on the host, over the session's SSH.

A small supervisor process (`python -m gpu_session.tunnel`) owns it: its ssh is the session's
ControlMaster (so `invoke ssh` and file transfers ride the same connection), and when the link
drops, ssh exits within 15 s (ServerAlive) and the supervisor connects again with backoff; a chat
sees a delay, not an error. State: tunnel.json (pid, port, the current ssh's pid) and tunnel.log
in the stack's folder.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .paths import stack_dir, write_private
from .ssh import SERVER_PORT, Endpoint, session_keys, ssh_command

BACKOFF = (0.5, 1, 2, 4, 8, 10)
STABLE_S = 30  # a connection that lived this long resets the backoff


class TunnelError(RuntimeError):
    pass


@dataclass(frozen=True)
class TunnelStatus:
    running: bool
    port: int | None = None
    connected: bool = False
    pid: int | None = None


def _state_file(stack: str) -> Path:
    return stack_dir(stack) / "tunnel.json"


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by a parent that is still around) is not a tunnel.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(stack: str) -> TunnelStatus:
    path = _state_file(stack)
    if not path.exists():
        return TunnelStatus(False)
    state = json.loads(path.read_text())
    running = _alive(state.get("pid"))
    return TunnelStatus(running, state.get("port"), running and _accepts(state["port"]), state.get("pid"))


def endpoint_of(stack: str) -> Endpoint:
    path = stack_dir(stack) / "endpoint.json"
    if not path.exists():
        raise TunnelError(f"stack {stack} is not up: `invoke up --stack {stack}` first")
    return Endpoint(**json.loads(path.read_text()))


def start(stack: str, port: int = 0, timeout: float = 30) -> TunnelStatus:
    """Start the supervisor (or return the running one) and wait until the local port answers."""
    current = status(stack)
    if current.running:
        return current
    endpoint = endpoint_of(stack)
    port = port or free_port()
    log = stack_dir(stack) / "tunnel.log"
    write_private(log, "")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_session.tunnel", "--stack", stack, "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,  # outlives the command that started it
        )  # fmt: skip
    write_private(_state_file(stack), json.dumps({"pid": proc.pid, "port": port}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _accepts(port):
            return status(stack)
        time.sleep(0.1)
    stop(stack)
    raise TunnelError(
        f"the tunnel to {endpoint.host}:{endpoint.port} did not open: {log.read_text().strip()[-500:] or 'no answer'}"
    )


def stop(stack: str) -> bool:
    """Stop the supervisor and its ssh; True when one was running."""
    path = _state_file(stack)
    if not path.exists():
        return False
    pid = json.loads(path.read_text()).get("pid")
    running = _alive(pid)
    if running:
        os.killpg(pid, signal.SIGTERM)  # the supervisor and its ssh: one process group
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    path.unlink(missing_ok=True)
    return running


def supervise(stack: str, port: int) -> None:
    keys = session_keys(stack)
    endpoint = endpoint_of(stack)
    forward = ["-N", "-o", "ExitOnForwardFailure=yes", "-o", "ControlMaster=yes", "-o", "ControlPersist=no",
               "-L", f"127.0.0.1:{port}:127.0.0.1:{SERVER_PORT}"]  # fmt: skip
    child: subprocess.Popen | None = None

    def on_term(signum, frame):
        if child is not None and child.poll() is None:
            child.terminate()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    attempt = 0
    while True:
        started = time.monotonic()
        (keys.dir / "cm").unlink(missing_ok=True)  # a master that died leaves its socket behind
        child = subprocess.Popen(ssh_command(keys, endpoint, *forward), stdin=subprocess.DEVNULL)
        state = json.loads(_state_file(stack).read_text())
        write_private(_state_file(stack), json.dumps({**state, "ssh_pid": child.pid}))
        print(f"{time.strftime('%H:%M:%S')} connecting to {endpoint.user}@{endpoint.host}:{endpoint.port}", flush=True)
        code = child.wait()
        attempt = 0 if time.monotonic() - started > STABLE_S else attempt + 1
        delay = BACKOFF[min(attempt, len(BACKOFF) - 1)]
        print(f"{time.strftime('%H:%M:%S')} the link dropped (ssh exited {code}); again in {delay}s", flush=True)
        time.sleep(delay)


def main() -> None:
    parser = argparse.ArgumentParser(description="Keep the session's tunnel up (started by `invoke tunnel start`)")
    parser.add_argument("--stack", required=True)
    parser.add_argument("--port", required=True, type=int)
    args = parser.parse_args()
    supervise(args.stack, args.port)


if __name__ == "__main__":
    main()
