"""`invoke doctor`: is this machine ready, and is what we keep here private? Each check says what
to do when it fails."""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from gpu_session.paths import config_dir, state_dir
from gpu_session.stack.automation import PulumiMissing, pulumi_binary


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _pulumi() -> Check:
    try:
        return Check("pulumi", True, str(pulumi_binary()))
    except PulumiMissing as e:
        return Check("pulumi", False, str(e))


def _tools() -> list[Check]:
    out = []
    for tool in ("ssh", "ssh-keygen", "ssh-keyscan"):
        found = shutil.which(tool)
        out.append(Check(tool, bool(found), found or f"install OpenSSH's client (apt-get install openssh-client) for {tool}"))
    return out


def _keys() -> list[Check]:
    out = []
    from gpu_session.clouds import API_KEY_ENV

    for cloud, var in API_KEY_ENV.items():
        if not os.environ.get(var):
            out.append(Check(f"{cloud} key", False, f"export {var}=... to use {cloud}"))
            continue
        from gpu_session.clouds import AuthError, CloudError, get_cloud

        try:
            n = len(get_cloud(cloud, api_key=os.environ[var]).offers())
            out.append(Check(f"{cloud} key", True, f"{var} works ({n} offers)"))
        except AuthError as e:
            out.append(Check(f"{cloud} key", False, f"{var} was refused: {e}"))
        except CloudError as e:  # no answer, or not one about the key
            out.append(Check(f"{cloud} key", False, f"{var} could not be checked: {e}"))
    return out


def private_files_problems(*roots: Path) -> list[str]:
    """Paths under roots that others could read: folders must be 0700, files 0600 (sockets aside)."""
    problems = []
    for root in roots:
        if not root.exists():
            continue
        for path in [root, *root.rglob("*")]:
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode) or stat.S_ISSOCK(mode):
                continue
            want = 0o700 if stat.S_ISDIR(mode) else 0o600
            if stat.S_IMODE(mode) & ~want:
                problems.append(f"{path} is {oct(stat.S_IMODE(mode))}: chmod {oct(want)[2:]} {path}")
    return problems


def _permissions() -> Check:
    roots = [
        config_dir(),
        *(state_dir() / name for name in ("stacks", "pulumi", "workspaces", "cache-workspaces", "logs", "ledger.db")),
    ]
    problems = private_files_problems(*roots)
    return Check("permissions", not problems, "; ".join(problems[:5]) or "config and state files are private (0600/0700)")


def run() -> list[Check]:
    return [_pulumi(), *_tools(), *_keys(), _permissions()]
