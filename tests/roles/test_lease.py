"""The lease role: a watchdog that reports, extends, and at expiry stops the server, wipes the data,
and ends a RunPod pod through its pod-scoped key (a Lambda host without an opted-in key wipes only)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from conftest import on

from gpu_session.host.ansible import ConfigureError, run


def in_seconds(s: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=s)).replace(microsecond=0).isoformat()


def start_fake_server(target, keypair) -> None:
    """Something in the model server's place: the service user's process on 127.0.0.1:8000 with a /health."""
    on(
        target,
        keypair,
        """sudo sh -c '
        mkdir -p /opt/gpu-session/www && echo ok > /opt/gpu-session/www/health && echo secret > /opt/gpu-session/uploads/x
        cd /opt/gpu-session/www && setsid sudo -u gpu-session python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 < /dev/null &
        echo $! > /run/gpu-session/gpu-session-model-server.pid
        for i in $(seq 50); do curl -sf -o /dev/null http://127.0.0.1:8000/health && break; sleep 0.1; done'""",
    )


def status(target, keypair) -> dict:
    return json.loads(on(target, keypair, "sudo cat /run/gpu-session/status.json"))


def wait_for_state(target, keypair, state: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = status(target, keypair)
        if s["state"] == state:
            return s
        time.sleep(0.5)
    raise AssertionError(f"lease state stayed {s['state']}: {s}")


def test_status_extend_and_expiry_that_wipes_a_host_that_cannot_end_itself(hosts, keypair):
    t = hosts["lambda"]
    run(t, role="host_base")
    start_fake_server(t, keypair)
    run(t, playbook="lease.yml", extravars={"lease_expires_at": in_seconds(3600), "lease_check_interval_s": 1})
    s = status(t, keypair)
    assert s["state"] == "active" and 3500 < s["lease_left_s"] <= 3600
    assert s["server"] == "healthy" and s["gpus"][0]["memory_total_mib"] == 23028
    assert s["protection"].startswith("wipe only")
    pid = on(t, keypair, "sudo cat /run/gpu-session/gpu-session-lease.pid")
    assert on(t, keypair, "sudo stat -c '%a %U' /etc/gpu-session/lease.json /usr/local/sbin/gpu-session-lease").split() == [
        "600",
        "root",
        "700",
        "root",
    ]

    # Same lease again: nothing changes, nothing restarts. (With another check interval the lease's
    # file would change: a no_log task, which this count missed until it came from the play's recap.)
    same = {"lease_expires_at": datetime.fromtimestamp(s["expires_at"], UTC).isoformat(), "lease_check_interval_s": 1}
    assert run(t, role="lease", extravars=same).changed == 0

    # Shorten it to seconds: the running watchdog picks it up and expires. The one change, the
    # lease's file, is a no_log task's: counted all the same (its result reaches us censored). The
    # lease must outlast the playbook's run (host_base's tasks come first, several seconds on a slow
    # machine): one that ended before its "Run the watchdog" task let the watchdog expire and exit,
    # and that task started another (2 changes, another pid), as CI saw on a 2-core machine.
    shortened = run(t, playbook="lease.yml", extravars={"lease_expires_at": in_seconds(20), "lease_check_interval_s": 1})
    assert shortened.changed == 1
    assert on(t, keypair, "sudo cat /run/gpu-session/gpu-session-lease.pid") == pid
    s = wait_for_state(t, keypair, "expired", timeout=60)
    assert s["wiped"] is True and s["server"] == "stopped"
    left = on(t, keypair, "sudo sh -c 'ls /opt/gpu-session /dev/shm/gpu-session 2>&1; pgrep -u gpu-session; "
                          "curl -s -o /dev/null -w %{http_code} http://127.0.0.1:8000/health; true'")  # fmt: skip
    assert "No such file" in left and left.strip().endswith("000"), left
    run(t, role="scrub")  # what `invoke down` does next; leaves the host clean for the other tests


def test_expiry_ends_a_runpod_pod_with_its_pod_scoped_key(sim, hosts, keypair):
    t = hosts["runpod"]
    pod_id = on(t, keypair, "echo $RUNPOD_POD_ID").strip()
    run(t, role="host_base")
    start_fake_server(t, keypair)
    run(t, playbook="lease.yml", extravars={"lease_expires_at": in_seconds(20), "lease_check_interval_s": 1})
    assert status(t, keypair)["protection"].startswith("self-terminate: the pod")  # (the playbook takes a few seconds)
    sim.wait_gone(pod_id, timeout=60)
    [event] = [e for e in sim.world.events if e["event"] == "terminate" and e["id"] == pod_id]
    assert event["by"] == "pod-key"


def test_bad_lease_input(hosts):
    with pytest.raises(ConfigureError, match="ISO 8601"):
        run(hosts["lambda"], playbook="lease.yml", extravars={"lease_expires_at": "tomorrow"})
    with pytest.raises(ConfigureError, match="lease_expires_at"):
        run(hosts["lambda"], role="lease")
