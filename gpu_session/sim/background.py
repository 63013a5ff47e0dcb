"""The simulator for a rehearsal (`up --sim`, `down --sim`): the one already running, or one
started in the background (its log under the state dir's logs/, 0600: it prints its keys)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import requests

from gpu_session.errors import GpuSessionError
from gpu_session.local import daemon
from gpu_session.paths import write_private

from . import default_state_dir

START_TIMEOUT_S = 300  # the first start builds the small models


class SimulatorError(GpuSessionError):
    """The simulator did not start; the message holds the end of its log."""


def running() -> dict | None:
    """The running simulator's sim.json ({"url", "admin_token", "env": {...}}), or None."""
    info_file = default_state_dir() / "sim.json"
    if not info_file.exists():
        return None
    info = json.loads(info_file.read_text())
    try:
        requests.get(info["url"] + "/_sim/state", headers={"X-Sim-Admin": info["admin_token"]}, timeout=5).raise_for_status()
    except requests.RequestException:
        return None
    return info


def use(say: Callable[[str], None]) -> dict[str, str]:
    """Point this process at the simulator, starting one in the background when none answers.
    The environment it set (the clouds' and the Hub's URLs and keys); SimulatorError when the
    simulator does not start within START_TIMEOUT_S."""
    info = running()
    if info is None:
        say(
            "starting the cloud simulator in the background (seconds; a minute or more the first time, when it builds its small models)"
        )
        log = daemon.log_path("sim", "simulator")
        write_private(log, "")
        with open(log, "ab") as out:
            subprocess.Popen([sys.executable, "-m", "gpu_session.sim", "--boot-delay", "1", "--no-rate-limits"],
                             stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while (info := running()) is None:
            if time.monotonic() > deadline:
                raise SimulatorError(f"the simulator did not start: {log.read_text()[-500:]}")
            time.sleep(0.5)
    env = dict(info["env"])
    if os.environ.get("GPU_SESSION_DEVICE"):  # said by the person (=cuda: a dry run plans for a real GPU): kept
        env.pop("GPU_SESSION_DEVICE", None)
    os.environ.update(env)
    return env
