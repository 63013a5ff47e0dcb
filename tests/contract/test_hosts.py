"""Simulated instances are real hosts: private network, filesystem and processes, reached only over SSH."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from conftest import FAST_RETRY, ssh

from gpu_session.clouds import LaunchSpec
from gpu_session.clouds.lambda_cloud import LambdaCloud
from gpu_session.local.tunnel import accepts, free_port
from gpu_session.sim import SimConfig, Simulator

pytestmark = pytest.mark.netns


@pytest.fixture
def two_hosts(sim, sim_env, keypair, name):
    if not sim.world.hosts.isolated:
        pytest.skip("isolated hosts need root (network, mount and PID namespaces)")
    cloud = LambdaCloud(retry=FAST_RETRY, launch_interval=0, poll_interval=0.05)
    key = cloud.register_ssh_key(f"{name}-key", keypair.public)
    ids = [cloud.launch(LaunchSpec(name=f"{name}-{n}", instance_type=t, ssh_key_name=key.name))
           for n, t in ((1, "gpu_1x_a10"), (2, "gpu_8x_h100_sxm5"))]  # fmt: skip
    endpoints = [cloud.wait_ready(i, time.monotonic() + 30) for i in ids]
    yield endpoints
    for i in ids:
        cloud.terminate_and_wait(i, time.monotonic() + 30)
    cloud.delete_ssh_key(key.id)


def can_connect(host: str, port: int) -> bool:
    return accepts(port, host)


def test_loopback_services_are_reachable_only_through_ssh(two_hosts, keypair, tmp_path):
    a, _ = two_hosts
    start = ssh(a, keypair, "nohup python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 & "
                            "for i in $(seq 50); do curl -sf http://127.0.0.1:8000/ >/dev/null && break; sleep 0.1; done; "
                            "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8000/")  # fmt: skip
    assert start.stdout == "200", start.stderr
    assert not can_connect("127.0.0.1", 8000) and not can_connect(a.host, 8000)

    local = free_port()
    tunnel = subprocess.Popen(
        ["ssh", "-i", str(keypair.private), "-N", "-L", f"127.0.0.1:{local}:127.0.0.1:8000", "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ExitOnForwardFailure=yes",
         f"{a.user}@{a.host}"],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not can_connect("127.0.0.1", local) and time.monotonic() < deadline:
            time.sleep(0.05)
        out = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{local}/"], capture_output=True, text=True
        )
        assert out.stdout == "200"
    finally:
        tunnel.terminate()
        tunnel.wait()


def test_filesystems_and_processes_are_private(two_hosts, keypair):
    """What a role writes anywhere on a host (/etc, /usr, /var included) stays on that host."""
    a, b = two_hosts
    marker = f"canary-{time.time_ns()}"
    paths = (
        "/opt/gpu-session/x",
        "/tmp/x",
        "/dev/shm/x",
        "/root/x",
        "/etc/gpu-session-x",
        "/usr/local/lib/gpu-session-x",
        "/var/lib/gpu-session-x",
    )
    write = " && ".join(f"echo {marker} | sudo tee {p} >/dev/null" for p in paths)
    out = ssh(a, keypair, f"sudo mkdir -p /opt/gpu-session && {write} && sudo useradd --system gpusvc && id -u gpusvc "
                          "&& (nohup sleep 300 >/dev/null 2>&1 &) ; cat /etc/gpu-session-x")  # fmt: skip
    assert out.returncode == 0 and out.stdout.split()[-1] == marker, out.stderr
    for path in paths:
        assert ssh(b, keypair, f"sudo test -e {path} && echo present || echo absent").stdout.strip() == "absent"
        assert not Path(path).exists(), f"{path} leaked onto the controller"
    assert "gpusvc" not in Path("/etc/passwd").read_text()
    assert ssh(b, keypair, "id -u gpusvc").returncode != 0
    # Each host sees only its own processes; the controller's are invisible.
    ps_b = ssh(b, keypair, "ps -eo comm=").stdout.split()
    assert "sleep" not in ps_b and "pytest" not in ps_b and ps_b[0] == "python3"  # PID 1: the host's init


def test_gpus_of_the_instance_type(two_hosts, keypair):
    a, b = two_hosts
    assert ssh(a, keypair, "nvidia-smi --query-gpu=count --format=csv,noheader").stdout.split() == ["1"]
    names = ssh(b, keypair, "nvidia-smi --query-gpu=name --format=csv,noheader").stdout.splitlines()
    assert names == ["NVIDIA H100 80GB"] * 8
    assert "SIMULATED" in ssh(b, keypair, "nvidia-smi").stdout


def test_the_hub_is_reachable_from_a_host(sim, two_hosts, keypair):
    a, _ = two_hosts
    out = ssh(a, keypair, f"curl -sf {sim.env()['HF_ENDPOINT']}/api/models/gpu-session/tiny-chat")
    assert out.returncode == 0 and '"gpu-session/tiny-chat"' in out.stdout


def test_loopback_fallback_without_isolation(tmp_path, keypair, monkeypatch):
    """What a user without root gets: sshd on a loopback port, as the current user, still terminated cleanly."""
    config = SimConfig(boot_delay=0.1, terminate_delay=0.05, gone_after=0.2, lambda_rate=0, isolate_hosts=False)
    with Simulator(tmp_path / "sim", config) as sim:
        monkeypatch.setenv("LAMBDA_API_BASE", sim.env()["LAMBDA_API_BASE"])
        cloud = LambdaCloud(api_key=sim.lambda_key, retry=FAST_RETRY, poll_interval=0.05)
        key = cloud.register_ssh_key("k", keypair.public)
        from gpu_session.clouds import LaunchSpec as Spec

        iid = cloud.launch(Spec(name="fallback", instance_type="gpu_1x_a10", ssh_key_name=key.name))
        endpoint = cloud.wait_ready(iid, time.monotonic() + 30)
        assert endpoint.host == "127.0.0.1" and endpoint.port != 22
        out = ssh(endpoint, keypair, "nohup sleep 300 >/dev/null 2>&1 & echo $GPU_SESSION_SIM_HOST")
        assert out.stdout.strip() == iid, out.stderr
        assert sim.host_pids(iid)
        cloud.terminate_and_wait(iid, time.monotonic() + 30)
        sim.wait_gone(iid)
        assert sim.host_pids(iid) == []
