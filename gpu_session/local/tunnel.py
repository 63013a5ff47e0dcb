"""The tunnel: 127.0.0.1:PORT here → 127.0.0.1:8000 on the host, over the session's SSH.

A small supervisor process (`python -m gpu_session.local.tunnel`) owns it: its ssh is the session's
ControlMaster (so `invoke ssh` and file transfers ride the same connection), and when the link
drops, ssh exits within 15 s (ServerAlive) and the supervisor connects again with backoff; a chat
sees a delay, not an error. State: tunnel.json (pid, port, the current ssh's pid) in the stack's
folder; its log under the state dir's logs/.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from gpu_session.errors import GpuSessionError, our_command
from gpu_session.host.ssh import SERVER_PORT, session_keys, ssh_command

from . import daemon, record

NAME = "tunnel"
BACKOFF = (0.5, 1, 2, 4, 8, 10)
STABLE_S = 30  # a connection that lived this long resets the backoff
# How long a client waits for the tunnel after a dropped link: ssh's ServerAlive (15 s) may already
# have passed, then the longest backoff (BACKOFF[-1]) and a new ssh handshake, with room to spare.
RECONNECT_S = 60
IDLE = "exec sleep 2147483647"  # the remote end of the tunnel's terminal session: waits, does nothing


class TunnelError(GpuSessionError, RuntimeError):
    pass


@dataclass(frozen=True)
class TunnelStatus:
    running: bool
    port: int | None = None
    connected: bool = False
    pid: int | None = None


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on host:port."""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(stack: str) -> TunnelStatus:
    state = daemon.state(stack, NAME)
    if not state:
        return TunnelStatus(False)
    running = daemon.alive(state.get("pid"))
    return TunnelStatus(running, state.get("port"), running and accepts(state["port"]), state.get("pid"))


def start(stack: str, port: int = 0, timeout: float = 30) -> TunnelStatus:
    """Start the supervisor (or return the running one) and wait until the local port answers."""
    current = status(stack)
    if current.running:
        return current
    endpoint = record.load(stack).endpoint
    port = port or free_port()
    proc = daemon.spawn(stack, NAME, "gpu_session.local.tunnel", "--stack", stack, "--port", str(port), port=port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if accepts(port):
            return status(stack)
        time.sleep(0.1)
    stop(stack)
    said = daemon.log_path(stack, NAME).read_text().strip()
    raise TunnelError(f"the tunnel to {endpoint.host}:{endpoint.port} did not open: {said[-500:] or 'no answer'}")


def reconnected(stack: str, port: int, timeout: float = RECONNECT_S) -> TunnelStatus:
    """Until the tunnel answers on `port` again after a dropped link. The supervisor reconnects by
    itself; one that is gone is started again on the same port, so a client's URL stays good."""
    deadline = time.monotonic() + timeout
    while True:
        current = status(stack)
        if not current.running:
            return start(stack, port)
        if current.connected:
            return current
        if time.monotonic() >= deadline:
            raise TunnelError(
                f"the tunnel did not reconnect within {timeout:.0f} s: its log is {daemon.log_path(stack, NAME)}; "
                f"{our_command('tunnel stop')} and chat again to open a new one"
            )
        time.sleep(0.2)


def stop(stack: str) -> bool:
    """Stop the supervisor and its ssh; True when one was running."""
    return daemon.stop(stack, NAME)


def supervise(stack: str, port: int) -> None:
    keys = session_keys(stack)
    endpoint = record.load(stack).endpoint
    # A terminal session beside the forward (-tt and an idle remote command, rather than -N): sshd
    # turns Nagle off only for interactive connections, and without that each streamed answer's
    # first chunks wait out a 40 ms delayed ACK (measured: first token 44 ms through, 10 ms on host).
    forward = ["-tt", "-o", "ExitOnForwardFailure=yes", "-o", "ControlMaster=yes", "-o", "ControlPersist=no",
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
        child = subprocess.Popen(ssh_command(keys, endpoint, *forward) + [IDLE], stdin=subprocess.DEVNULL)
        daemon.update(stack, NAME, ssh_pid=child.pid)
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
