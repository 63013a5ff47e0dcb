"""The session's SSH identity and the host keys it trusts, kept in the stack's own folder.

- `id_ed25519`: the session's key pair, made for this stack alone and deleted by `down`.
- `host_ed25519_key`: a host key made for the session. Lambda instances get it through cloud-init,
  so it is pinned before the first connection. RunPod pods cannot take one: the first key a pod
  shows is pinned (`pin_first_seen`), and every later connection must match it.
- `known_hosts`: the pins. Nothing here ever trusts a key it has not pinned.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from gpu_session.errors import GpuSessionError
from gpu_session.paths import stack_dir, write_private


class HostKeyError(GpuSessionError, RuntimeError):
    """The host's key cannot be learned, or differs from the pinned one."""


@dataclass(frozen=True)
class SessionKeys:
    dir: Path

    @property
    def private_key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def public_key(self) -> str:
        return (self.dir / "id_ed25519.pub").read_text().strip()

    @property
    def host_private_key(self) -> str:
        return (self.dir / "host_ed25519_key").read_text()

    @property
    def host_public_key(self) -> str:
        return (self.dir / "host_ed25519_key.pub").read_text().strip()

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"


def _keypair(path: Path, comment: str) -> None:
    if path.exists() and path.with_suffix(".pub").exists():
        return
    for p in (path, Path(f"{path}.pub")):
        p.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True)
    for p in (path, Path(f"{path}.pub")):
        p.chmod(0o600)


def session_keys(stack: str) -> SessionKeys:
    """The stack's keys, made on first use."""
    keys = SessionKeys(stack_dir(stack))
    _keypair(keys.private_key, f"gpu-session-{stack}")
    _keypair(keys.dir / "host_ed25519_key", f"gpu-session-{stack}-host")
    if not keys.known_hosts.exists():
        write_private(keys.known_hosts, "")
    return keys


def _host_pattern(host: str, port: int) -> str:
    return host if int(port) == 22 else f"[{host}]:{port}"


def pinned(known_hosts: Path, host: str, port: int) -> list[str]:
    pattern = _host_pattern(host, port)
    lines = known_hosts.read_text().splitlines() if known_hosts.exists() else []
    return [line for line in lines if line.split(" ", 1)[0] == pattern]


def pin(known_hosts: Path, host: str, port: int, public_key: str) -> None:
    """Trust exactly `public_key` ("ssh-ed25519 AAAA… comment") for host:port, replacing any earlier pin
    for that address (a new instance may reuse an address)."""
    pattern = _host_pattern(host, port)
    kept = [line for line in (known_hosts.read_text().splitlines() if known_hosts.exists() else [])
            if line.split(" ", 1)[0] != pattern]  # fmt: skip
    key = " ".join(public_key.split()[:2])
    write_private(known_hosts, "".join(f"{line}\n" for line in [*kept, f"{pattern} {key}"]))


def pin_first_seen(known_hosts: Path, host: str, port: int) -> None:
    """Pin the key the host shows now, unless one is pinned already (which then stays in force)."""
    if pinned(known_hosts, host, port):
        return
    scan = subprocess.run(["ssh-keyscan", "-T", "10", "-t", "ed25519", "-p", str(port), host], capture_output=True, text=True)
    keys = [line.split(" ", 1)[1] for line in scan.stdout.splitlines() if line and not line.startswith("#")]
    if not keys:
        raise HostKeyError(f"{host}:{port} showed no ed25519 host key: {scan.stderr.strip() or 'no answer'}")
    pin(known_hosts, host, port, keys[0])


# --- the connection: one ControlMaster per session, the tunnel kept up by a small supervisor -----

SERVER_PORT = 8000  # the model server, on the host's loopback only


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    user: str

    @classmethod
    def of(cls, outputs: dict) -> Endpoint:
        return cls(outputs["host"], int(outputs["port"]), outputs["user"])


def ssh_options(keys: SessionKeys) -> list[str]:
    """Our key only, the pinned host key only, one shared connection (ControlMaster) per session,
    and a dead link noticed within 15 s."""
    return [
        "-i", str(keys.private_key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={keys.known_hosts}",
        "-o", "ControlMaster=auto", "-o", f"ControlPath={keys.dir / 'cm'}", "-o", "ControlPersist=60",
        "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
    ]  # fmt: skip


def ssh_command(keys: SessionKeys, endpoint: Endpoint, *extra: str) -> list[str]:
    """ssh to the host; `extra` options come first, and ssh keeps the first value it is given."""
    return ["ssh", *extra, *ssh_options(keys), "-p", str(endpoint.port), f"{endpoint.user}@{endpoint.host}"]
