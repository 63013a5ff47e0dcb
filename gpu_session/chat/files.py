"""Files between this machine and the session's host, over the session's SSH (the tunnel's
ControlMaster when it runs), for /upload and /download.

Uploads land in the host's uploads folder under the data root, written by the service user with
umask 077 (scrub wipes them with everything else). Downloads come only from the data root: the
host resolves the path (symlinks included) and anything outside is refused. A local file is never
overwritten without a yes.
"""

from __future__ import annotations

import posixpath
import re
import shlex
import subprocess
from pathlib import Path

from gpu_session.errors import GpuSessionError
from gpu_session.host.ssh import session_keys, ssh_command
from gpu_session.local import record
from gpu_session.paths import write_private

DATA_ROOT = "/opt/gpu-session"
UPLOADS = f"{DATA_ROOT}/uploads"
SERVICE_USER = "gpu-session"
MAX_BYTES = 100 * 1024**2
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,127}$")


class TransferError(GpuSessionError, RuntimeError):
    """Refused or failed; the message says why, and nothing was changed."""


def _on_host(stack: str, command: str, data: bytes | None = None) -> bytes:
    """Run `command` on the host as the service user (sudo for the ubuntu user, runuser as root)."""
    endpoint = record.load(stack).endpoint
    as_service = f"sudo -n -u {SERVICE_USER}" if endpoint.user != "root" else f"runuser -u {SERVICE_USER} --"
    argv = ssh_command(session_keys(stack), endpoint) + [f"{as_service} sh -c {shlex.quote(command)}"]
    out = subprocess.run(argv, input=data, capture_output=True, timeout=600)
    if out.returncode != 0:
        raise TransferError(out.stderr.decode(errors="replace").strip() or f"the host answered {out.returncode}")
    return out.stdout


def local_source(path: str) -> Path:
    """The file to upload: symlinks resolved, a regular file, within the size limit."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise TransferError(f"{path}: not a file")
    if resolved.stat().st_size > MAX_BYTES:
        raise TransferError(f"{path}: larger than {MAX_BYTES // 1024**2} MB")
    return resolved


def upload(stack: str, path: str) -> str:
    """Copy a local file into the host's uploads folder; the path it has there."""
    source = local_source(path)
    if not SAFE_NAME.match(source.name):
        raise TransferError(f"{source.name!r}: name the file with letters, digits, space, '.', '_' or '-'")
    remote = f"{UPLOADS}/{source.name}"
    _on_host(stack, f"umask 077 && cat > {shlex.quote(remote)}", source.read_bytes())
    return remote


def remote_source(stack: str, remote: str) -> str:
    """The host's own answer to where `remote` (relative to the data root, or absolute) really is,
    refused unless it is a file inside the data root."""
    wanted = posixpath.normpath(posixpath.join(DATA_ROOT, remote))
    try:
        resolved = _on_host(stack, f"realpath -e -- {shlex.quote(wanted)}").decode().strip()
    except TransferError:
        raise TransferError(f"{remote}: no such file on the host") from None
    if not resolved.startswith(DATA_ROOT + "/"):
        raise TransferError(f"{remote}: outside {DATA_ROOT}; only the session's files can be downloaded")
    return resolved


def download(stack: str, remote: str, local: str | None = None, overwrite=lambda path: False) -> Path:
    """Copy a file of the session's data root here (default: its name in the current folder).
    `overwrite(path)` is asked before an existing file is replaced."""
    source = remote_source(stack, remote)
    target = Path(local or posixpath.basename(source)).expanduser()
    if target.is_dir():
        target = target / posixpath.basename(source)
    if target.exists() and not overwrite(target):
        raise TransferError(f"{target} exists: nothing was overwritten")
    size = int(_on_host(stack, f"stat -c %s -- {shlex.quote(source)}").decode().strip() or 0)
    if size > MAX_BYTES:
        raise TransferError(f"{remote}: larger than {MAX_BYTES // 1024**2} MB")
    write_private(target.resolve(), _on_host(stack, f"cat -- {shlex.quote(source)}"))
    return target
