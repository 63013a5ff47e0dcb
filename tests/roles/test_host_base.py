"""The host_base role on simulator hosts of both clouds (no systemd: the daemon path, as on RunPod)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import on

from gpu_session.configure import ConfigureError, run


@pytest.fixture(scope="module")
def converged(hosts):
    """Both hosts converged once, with a Hub endpoint and an extra variable."""
    extra = {"host_base_hf_endpoint": "http://hub.invalid:1234", "host_base_environment": {"GPU_SESSION_STACK": "dev"}}
    return {name: run(t, role="host_base", extravars=extra) for name, t in hosts.items()}


def test_platform_and_process_manager_are_detected(converged):
    lam, rp = converged["lambda"].facts, converged["runpod"].facts
    # The simulator's Lambda hosts have no systemd, so they are "generic" daemon hosts; RunPod is found by its pod id.
    assert (rp["host_base_platform_name"], rp["host_base_process_manager_name"]) == ("runpod", "daemon")
    assert (lam["host_base_platform_name"], lam["host_base_process_manager_name"]) == ("generic", "daemon")


@pytest.mark.parametrize("which", ["lambda", "runpod"])
def test_data_root_environment_and_shells(hosts, converged, keypair, which):
    t = hosts[which]
    stat = on(
        t, keypair, "sudo stat -c '%U %a %n' /opt/gpu-session /opt/gpu-session/env /opt/gpu-session/tmp /dev/shm/gpu-session"
    )
    assert stat.splitlines() == [
        "gpu-session 750 /opt/gpu-session",
        "gpu-session 600 /opt/gpu-session/env",
        "gpu-session 700 /opt/gpu-session/tmp",
        "gpu-session 700 /dev/shm/gpu-session",
    ]
    env = dict(
        line.split("=", 1)
        for line in on(t, keypair, "sudo cat /opt/gpu-session/env").splitlines()
        if "=" in line and not line.startswith("#")
    )
    for cache in (
        "HF_HOME",
        "HF_XET_CACHE",
        "VLLM_CACHE_ROOT",
        "TRITON_CACHE_DIR",
        "TORCHINDUCTOR_CACHE_DIR",
        "XDG_CACHE_HOME",
        "TMPDIR",
        "UV_CACHE_DIR",
        "PIP_CACHE_DIR",
    ):
        assert env[cache].startswith("/opt/gpu-session/"), cache
    assert env["VLLM_NO_USAGE_STATS"] == env["HF_HUB_DISABLE_TELEMETRY"] == env["DO_NOT_TRACK"] == "1"
    assert env["HF_ENDPOINT"] == "http://hub.invalid:1234" and env["GPU_SESSION_STACK"] == "dev"
    # A login shell keeps no history.
    assert on(t, keypair, "bash -lc 'echo ${HISTFILE:-none} $HISTSIZE'").split() == ["none", "0"]
    # uv came from the controller (the same version), not from the internet the host does not have.
    ours = subprocess.run([Path(sys.executable).with_name("uv"), "--version"], capture_output=True, text=True).stdout
    assert on(t, keypair, "/usr/local/bin/uv --version") == ours


def test_second_converge_changes_nothing(hosts, converged):
    extra = {"host_base_hf_endpoint": "http://hub.invalid:1234", "host_base_environment": {"GPU_SESSION_STACK": "dev"}}
    for t in hosts.values():
        assert run(t, role="host_base", extravars=extra).changed == 0


def test_bad_input_is_refused(hosts, converged):
    with pytest.raises(ConfigureError, match="host_base_platform"):
        run(hosts["lambda"], role="host_base", extravars={"host_base_platform": "aws"})
    with pytest.raises(ConfigureError, match="systemd is not running"):
        run(hosts["runpod"], role="host_base", extravars={"host_base_process_manager": "systemd"})
