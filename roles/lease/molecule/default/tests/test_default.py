"""Let the lease run out: the Lambda host stops its server and wipes its data, and says so; the
RunPod pod is terminated through its own pod-scoped key."""

import json
import os
import subprocess
import sys
import time

import testinfra.utils.ansible_runner

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"]).get_hosts("lambda")
POD = f"molecule-{os.environ['MOLECULE_SCENARIO_NAME']}-lease-runpod"


def wait_for(check, timeout=150):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(2)
    return result


def status(host) -> dict:
    with host.sudo():
        return json.loads(host.file("/run/gpu-session/status.json").content_string)


def test_a_lambda_host_without_a_key_wipes_itself(host):
    assert status(host)["protection"].startswith("wipe only")
    expired = wait_for(lambda: (s := status(host))["state"] == "expired" and s)
    assert expired["wiped"] is True and expired["server"] == "stopped"
    assert not host.socket("tcp://127.0.0.1:8000").is_listening
    with host.sudo():
        assert not host.file("/opt/gpu-session").exists and not host.file("/dev/shm/gpu-session").exists
        assert host.run("pgrep -u gpu-session").rc == 1


def simulator_terminations() -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "gpu_session.sim", "--list", "--json"], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)["terminations"]


def test_a_runpod_pod_ends_itself_with_its_pod_key():
    [ended] = wait_for(lambda: [t for t in simulator_terminations() if t["name"] == POD])
    assert ended["by"] == "pod-key"
