"""`invoke sim` as a person runs it: export lines to eval, --list, faults into a running simulator, --stop, clean stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from gpu_session.clouds.lambda_cloud import LambdaCloud


def run_cli(*args: str, state: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpu_session.sim", "--state-dir", str(state), *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def start(state: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """A foreground simulator on `state`, and the export lines it printed first."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpu_session.sim", "--state-dir", str(state), "--boot-delay", "0.1", "--no-rate-limits"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    env = {}
    while len(env) < 7:
        line = proc.stdout.readline()
        assert line.startswith("export "), line + proc.stderr.read()
        k, _, v = line[len("export ") :].strip().partition("=")
        env[k] = v
    return proc, env


def test_foreground_simulator_prints_exports_and_stops_cleanly(tmp_path):
    state = tmp_path / "sim"
    proc, env = start(state)
    try:
        assert set(env) == {
            "LAMBDA_API_BASE",
            "RUNPOD_API_BASE_URL",
            "RUNPOD_REST_API_BASE_URL",
            "HF_ENDPOINT",
            "LAMBDA_API_KEY",
            "RUNPOD_API_KEY",
            "HF_TOKEN",
        }
        assert oct((state / "sim.json").stat().st_mode & 0o777) == "0o600"

        # A second terminal gets the same lines from the running simulator, ready for eval.
        again = subprocess.run(["bash", "-c", f"eval \"$({sys.executable} -m gpu_session.sim --state-dir {state} --env)\" && echo $LAMBDA_API_KEY"],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert again.stdout.strip() == env["LAMBDA_API_KEY"], again.stderr
        cloud = LambdaCloud(api_key=env["LAMBDA_API_KEY"], base_url=env["LAMBDA_API_BASE"])
        assert any(o.instance_type == "gpu_1x_a10" for o in cloud.offers())

        added = run_cli("--fault", "lambda:instance-operations/launch:503:2", "--capacity", "lambda:gpu_1x_a10=0", state=state)
        assert added.returncode == 0, added.stderr
        listed = run_cli("--list", "--json", state=state)
        state_json = json.loads(listed.stdout)
        assert state_json["faults"] == [{"target": "lambda:instance-operations/launch", "kind": "503", "times": 2, "delay": 5.0}]
        assert not next(o for o in cloud.offers() if o.instance_type == "gpu_1x_a10").regions
        table = run_cli("--list", state=state)
        assert "simulated instances" in table.stdout

        # --stop is refused while an instance runs (its session would lose its host), and then stops it.
        api = requests.Session()
        api.headers["Authorization"] = f"Bearer {env['LAMBDA_API_KEY']}"
        base = env["LAMBDA_API_BASE"]
        key = api.post(f"{base}/ssh-keys", json={"name": "stop-test"}, timeout=10).json()["data"]["name"]
        types = api.get(f"{base}/instance-types", timeout=10).json()["data"]
        free, offer = next((n, t) for n, t in types.items() if t["regions_with_capacity_available"])
        launch = {
            "region_name": offer["regions_with_capacity_available"][0]["name"],
            "instance_type_name": free,
            "ssh_key_names": [key],
        }
        for _ in range(3):  # the two 503s injected above come first
            launched = api.post(f"{base}/instance-operations/launch", json=launch, timeout=30)
            if launched.ok:
                break
        instance = launched.json()["data"]["instance_ids"][0]
        refused = run_cli("--stop", state=state)
        assert refused.returncode != 0 and instance in refused.stderr and "invoke down" in refused.stderr, refused.stderr
        assert proc.poll() is None and (state / "sim.json").exists()  # refused: still serving
        api.post(f"{base}/instance-operations/terminate", json={"instance_ids": [instance]}, timeout=30).raise_for_status()
        stopped = run_cli("--stop", state=state)
        assert stopped.returncode == 0 and "stopped the simulator" in stopped.stderr, stopped.stderr
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert not (state / "sim.json").exists()
    assert "nothing to stop" in run_cli("--stop", state=state).stderr
    assert run_cli("--list", state=state).returncode != 0  # says none is running
    assert "no simulator is running" in run_cli("--env", state=state).stderr

    # Restarted, it listens where it did (sessions and cache stacks recorded that address), with
    # the same keys; with that port taken, on another.
    proc, again = start(state)
    try:
        assert again == env
        assert oct((state / "port").stat().st_mode & 0o777) == "0o600"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    port = int(env["LAMBDA_API_BASE"].split(":")[2].split("/")[0])
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the last run's connections may be in TIME_WAIT
        taken.bind(("127.0.0.1", port))
        taken.listen()
        proc, moved = start(state)
        try:
            assert moved["LAMBDA_API_KEY"] == env["LAMBDA_API_KEY"] and moved["LAMBDA_API_BASE"] != env["LAMBDA_API_BASE"]
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0


def test_bad_cli_input_says_what_to_do(tmp_path):
    out = run_cli("--fault", "lambda:launch:explode", state=tmp_path)
    assert out.returncode != 0 and "KIND one of" in out.stderr
    out = run_cli("--capacity", "aws:p5=1", state=tmp_path)
    assert out.returncode != 0 and "CLOUD lambda or runpod" in out.stderr


def test_cleanup_reclaims_what_a_killed_simulator_left(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("networks exist only for root")
    state = tmp_path / "sim"
    proc = subprocess.Popen([sys.executable, "-m", "gpu_session.sim", "--state-dir", str(state)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    proc.stdout.readline()
    net = json.loads((state / "sim.json").read_text())["env"]["HF_ENDPOINT"].split(".")[1]
    bridge = f"gss{int(net) - 200}br"
    assert bridge in subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    proc.kill()
    proc.wait()
    time.sleep(0.1)
    stopped = run_cli("--stop", state=state)  # a dead one's sim.json goes, and --cleanup is named
    assert stopped.returncode == 0 and "had died" in stopped.stderr and "--cleanup" in stopped.stderr, stopped.stderr
    assert not (state / "sim.json").exists()
    cleaned = run_cli("--cleanup", state=state)
    assert cleaned.returncode == 0 and cleaned.stderr.startswith("removed ") and "network(s)" in cleaned.stderr, cleaned.stderr
    assert bridge not in subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
