"""The host_base role on simulator hosts of both clouds (no systemd: the daemon path, as on RunPod)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import on

from gpu_session.host.ansible import ConfigureError, run


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
def test_extra_environment_and_uv_on_both_clouds(hosts, converged, keypair, which):
    """The data root, modes, caches and shells are the molecule scenario's (roles/host_base/molecule);
    here: both clouds' users, extra variables, and uv copied from the controller."""
    t = hosts[which]
    env = on(t, keypair, "sudo cat /opt/gpu-session/env").splitlines()
    assert "HF_ENDPOINT=http://hub.invalid:1234" in env and "GPU_SESSION_STACK=dev" in env
    assert on(t, keypair, "sudo stat -c '%U:%G %a' /opt/gpu-session/env").strip() == "root:gpu-session 640"
    # uv came from the controller (the same version), not from the internet the host does not have.
    ours = subprocess.run([Path(sys.executable).with_name("uv"), "--version"], capture_output=True, text=True).stdout
    assert on(t, keypair, "/usr/local/bin/uv --version") == ours


def test_second_converge_changes_nothing(hosts, converged):
    extra = {"host_base_hf_endpoint": "http://hub.invalid:1234", "host_base_environment": {"GPU_SESSION_STACK": "dev"}}
    for t in hosts.values():
        assert run(t, role="host_base", extravars=extra).changed == 0


def test_a_wrong_mode_is_put_right_and_a_planted_link_refused(hosts, converged, keypair):
    """The data root's folders: one with another mode is put right (and reported changed). The
    service user cannot put a link in a folder's place (the data root is root's); a link there all the
    same (the shm root's parent, /dev/shm, is anyone's to write) is refused, and what it points at is
    left alone."""
    t = hosts["runpod"]
    extra = {"host_base_hf_endpoint": "http://hub.invalid:1234", "host_base_environment": {"GPU_SESSION_STACK": "dev"}}
    on(t, keypair, "chmod 0777 /opt/gpu-session/uploads")
    assert run(t, role="host_base", extravars=extra).changed == 1
    assert on(t, keypair, "stat -c '%U %a' /opt/gpu-session/uploads").strip() == "gpu-session 750"
    denied = on(t, keypair, "runuser -u gpu-session -- mv /opt/gpu-session/hf /opt/gpu-session/hf.x 2>&1; echo rc=$?")
    assert "Permission denied" in denied and "rc=0" not in denied, denied
    on(t, keypair, "mkdir -p /srv/victim && chmod 0755 /srv/victim && mv /opt/gpu-session/hf /opt/gpu-session/hf.moved"
                   " && ln -s /srv/victim /opt/gpu-session/hf")  # fmt: skip
    try:
        with pytest.raises(ConfigureError, match="/opt/gpu-session/hf is a symbolic link"):
            run(t, role="host_base", extravars=extra)
        assert on(t, keypair, "stat -c '%U %a' /srv/victim").strip() == "root 755"
    finally:
        on(t, keypair, "rm /opt/gpu-session/hf && mv /opt/gpu-session/hf.moved /opt/gpu-session/hf")


def test_bad_input_is_refused(hosts, converged):
    with pytest.raises(ConfigureError, match="host_base_platform"):
        run(hosts["lambda"], role="host_base", extravars={"host_base_platform": "aws"})
    with pytest.raises(ConfigureError, match="systemd is not running"):
        run(hosts["runpod"], role="host_base", extravars={"host_base_process_manager": "systemd"})
