"""The controller's uv as gpu-session passes it to host_base (host_base_controller_uv): the same lines
the role's own lookup gives, hashed once per binary, hashed again when the binary changes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from gpu_session.host import ansible
from gpu_session.paths import state_dir


def lookup(uv: Path) -> list[str]:
    """What the role's pipe lookup prints (roles/host_base/tasks/uv.yml, with a cache volume)."""
    q = str(uv)
    line = f"uname -sm; {q} --version 2>/dev/null && sha256sum < {q} 2>/dev/null && wc -c < {q} || true"
    return subprocess.run(["sh", "-c", line], capture_output=True, text=True, check=True).stdout.splitlines()


def test_the_lines_are_the_lookups_and_are_hashed_once_per_binary(tmp_path, monkeypatch):
    real = Path(sys.executable).with_name("uv")
    assert ansible.controller_uv(real) == lookup(real)  # the uv that host_base copies

    uv = tmp_path / "uv"
    uv.write_text("#!/bin/sh\necho 'uv 9.9.9 (x86_64-unknown-linux-gnu)'\n")
    uv.chmod(0o755)
    hashed = []
    digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, name: hashed.append(name) or digest(f, name))
    first = ansible.controller_uv(uv)
    assert first == lookup(uv) and first[1] == "uv 9.9.9 (x86_64-unknown-linux-gnu)" and hashed == ["sha256"]
    assert ansible.controller_uv(uv) == first and hashed == ["sha256"]  # kept: not read again
    assert (state_dir() / "controller-uv.json").stat().st_mode & 0o777 == 0o600

    with uv.open("a") as f:  # another binary at the same path: hashed again
        f.write("# a byte more\n")
    again = ansible.controller_uv(uv)
    assert again == lookup(uv) and again != first and hashed == ["sha256", "sha256"]


def test_no_uv_or_one_that_does_not_run_gives_the_system_alone(tmp_path):
    assert ansible.controller_uv(tmp_path / "none") == lookup(tmp_path / "none") == [lookup(tmp_path / "none")[0]]
    broken = tmp_path / "uv"
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    assert ansible.controller_uv(broken) == lookup(broken)
