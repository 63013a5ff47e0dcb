"""Every role's molecule scenarios against the tests' own simulator: create (a simulator host),
prepare, converge, idempotence, verify (testinfra, or Ansible for gpu_check), destroy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # the checkout


SCENARIOS = sorted((p.parents[2].name, p.parent.name) for p in (ROOT / "roles").glob("*/molecule/*/molecule.yml"))


def test_every_role_has_a_scenario():
    assert {role for role, _ in SCENARIOS} == {p.name for p in (ROOT / "roles").iterdir() if p.is_dir()}


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("role", "scenario"), SCENARIOS, ids=[f"{r}-{s}" for r, s in SCENARIOS])
def test_scenario(sim, wheelhouse, role, scenario):
    home = tempfile.mkdtemp(prefix="mol-")  # short: SSH's control sockets live under it
    env = {
        **os.environ,
        **sim.env(),
        "GPU_SESSION_WHEELHOUSE": str(wheelhouse),
        "GPU_SESSION_SIM_DIR": str(sim.state_dir),  # the lease scenario asks the simulator who ended its pod
        "HOME": home,  # molecule's ephemeral state, Ansible's ~/.ansible: this test's own
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "NO_COLOR": "1",
    }
    run = subprocess.run(
        [sys.executable, "-m", "molecule", "test", "-s", scenario],
        cwd=ROOT / "roles" / role, env=env, capture_output=True, text=True, timeout=880,
    )  # fmt: skip
    shutil.rmtree(home, ignore_errors=True)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert "idempotence" in out and "verify" in out
