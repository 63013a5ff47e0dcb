"""Where gpu-session keeps its files on the controller, and how it writes the private ones.

State (XDG_STATE_HOME, default ~/.local/state/gpu-session): the Pulumi backend, one folder per stack
(session key, pinned host keys, the model server's key, receipts), the ledger. Config
(XDG_CONFIG_HOME, default ~/.config/gpu-session). Every folder 0700, every file 0600.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

from gpu_session.errors import GpuSessionError

# The Pulumi project (Pulumi.yaml, infra/), ansible.cfg, playbooks/, roles/, templates/ and
# inventory/: the checkout's top-level folders, which the package carries as gpu_session/assets
# (links in a checkout, copies once installed), so an installed `gpu-session` finds them too.
ASSETS = Path(__file__).resolve().parent / "assets"
# The folder that holds the gpu_session package (the checkout, or site-packages once installed).
PACKAGE_PARENT = Path(__file__).resolve().parent.parent
STACK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")


class BadStackName(GpuSessionError, ValueError):
    """A stack name that is not letters, digits, '.', '_' or '-' (up to 40)."""


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gpu-session"


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "gpu-session"


def private_dir(path: Path) -> Path:
    """`path`, created 0700, and so is every folder between it and our state or config root."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    roots = {state_dir(), config_dir()}
    for folder in [path, *path.parents]:
        if not any(folder == root or root in folder.parents for root in roots):
            break  # above our roots: the user's own folders, not ours to change
        folder.chmod(0o700)
    return path


def make_private(tree: Path) -> None:
    """Every folder under `tree` 0700 and every file 0600 (symlinks left alone): for what another
    program wrote there with its own modes (the Pulumi file backend: 0755 and 0644)."""
    for folder, _, files in os.walk(tree):
        with contextlib.suppress(FileNotFoundError):  # gone since the walk listed it: another process's temporary file
            os.chmod(folder, 0o700)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(path, 0o600)


def checked_stack_name(stack: str) -> str:
    """`stack`, when it is a name we accept (it becomes a folder name): else BadStackName."""
    if not STACK_NAME.match(stack or ""):
        raise BadStackName(f"invalid stack name {stack!r}: use up to 40 letters, digits, '.', '_' or '-'")
    return stack


def stack_dir(stack: str, *, create: bool = True) -> Path:
    """The stack's own folder: its session key, known_hosts, the model server's key, receipts.
    create=False for a reader: a look at a stack that never was leaves no empty folder behind."""
    path = state_dir() / "stacks" / checked_stack_name(stack)
    return private_dir(path) if create else path


def write_private(path: Path, data: str | bytes, *, replace: bool = True) -> Path:
    """Write atomically with mode 0600 from the first byte (no window where another user could read).
    replace=False: only where `path` does not exist yet; of two processes writing it at once, the
    first one's file stays whole (a hard link, which never replaces; where the filesystem has none,
    a replace when the file is still missing)."""
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp: 0600
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    if replace:
        os.replace(tmp, path)
        return path
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links: replace, unless the file came meanwhile
        if not path.exists():
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path
