"""model_server's download job (roles/model_server/files/gpu-session-download-job.py), run as the
role runs it: `start` returns at once with the job detached, `status` says how far it is, ends
with the job's exit status and stderr, and says so when the job's process is gone without a result.
(tests/roles/test_model_server.py runs it on a host, with the real download, and scrub ending it.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gpu_session.paths import ASSETS

JOB = ASSETS / "roles" / "model_server" / "files" / "gpu-session-download-job.py"


def job(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})  # fmt: skip


def status(path, hub) -> tuple[dict, int, str]:
    done = job("status", "--job", str(path), "--model", "owner/name", "--total", "10", HF_HUB_CACHE=str(hub))
    return json.loads(done.stdout), done.returncode, done.stderr


def wait_finished(path, hub) -> tuple[dict, int, str]:
    for _ in range(200):
        said = status(path, hub)
        if said[0]["finished"]:
            return said
        time.sleep(0.05)
    raise AssertionError("the job never finished")


def test_a_job_runs_detached_and_status_ends_with_its_exit_status_and_output(tmp_path):
    path = tmp_path / "download.json"
    blobs = tmp_path / "models--owner--name" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "part.incomplete").write_bytes(b"12345")
    gate = tmp_path / "gate"  # the job runs until the test opens it
    script = (
        f"import os, sys, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.02)\n"
        'print(\'{"path": "/x", "seconds": 1}\'); sys.stderr.write("no space left\\n"); sys.exit(3)'
    )
    started = job("start", "--job", str(path), "--", sys.executable, "-c", script)
    assert started.returncode == 0 and started.stdout == started.stderr == ""
    on_file = json.loads(path.read_text())  # when start returns, the file names the job's process
    assert on_file["started"] == 1 and on_file["since"] and os.getpgid(on_file["pid"]) != os.getpgid(0)
    running, rc, _ = status(path, tmp_path)
    assert running == {"bytes": 5, "total": 10, "finished": False} and rc == 0  # partial files count
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    gate.touch()
    said, rc, err = wait_finished(path, tmp_path)
    assert said == {"path": "/x", "seconds": 1, "bytes": 5, "total": 10, "finished": True}
    assert rc == 3 and err == "no space left\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["download.json", "gate", "models--owner--name"]  # no .part left


def test_a_second_start_ends_the_job_an_interrupted_converge_left_and_keeps_its_result_out(tmp_path):
    """One download at a time: a start while an earlier job runs ends it (and what it started), and
    the earlier job's result never lands in the file the new start reports to."""
    path = tmp_path / "download.json"
    late = "import signal, time\nsignal.signal(signal.SIGTERM, lambda *a: print('{\"old\": 1}') or exit(0))\ntime.sleep(60)"
    assert job("start", "--job", str(path), "--", sys.executable, "-c", late).returncode == 0
    earlier = json.loads(path.read_text())
    assert job("start", "--job", str(path), "--", sys.executable, "-c", "print('{\"new\": 1}')").returncode == 0
    assert (
        not Path(f"/proc/{earlier['pid']}").exists() or "Z" in Path(f"/proc/{earlier['pid']}/stat").read_text().split(")")[1][:3]
    )
    said, rc, _ = wait_finished(path, tmp_path)
    assert rc == 0 and said.get("new") == 1 and "old" not in said, said
    time.sleep(0.3)
    assert "old" not in path.read_text()


def test_a_job_whose_process_is_gone_without_a_result_fails_saying_so(tmp_path):
    path = tmp_path / "download.json"
    assert job("start", "--job", str(path), "--", "sleep", "60").returncode == 0
    for _ in range(100):  # the job's process writes its pid first
        pid = json.loads(path.read_text()).get("pid")
        if pid:
            break
        time.sleep(0.05)
    os.killpg(os.getpgid(pid), signal.SIGKILL)  # the job and its command, as a reboot would: no result written
    _, rc, err = wait_finished(path, tmp_path)
    assert rc == 1 and "its process is gone" in err and "run up again" in err


def test_a_command_that_cannot_start_or_is_killed_says_why(tmp_path):
    missing = tmp_path / "missing.json"
    assert job("start", "--job", str(missing), "--", str(tmp_path / "no-such-tool")).returncode == 0
    _, rc, err = wait_finished(missing, tmp_path)
    assert rc == 127 and "no-such-tool" in err
    killed = tmp_path / "killed.json"
    assert job("start", "--job", str(killed), "--", "sh", "-c", "kill -TERM $$").returncode == 0
    _, rc, err = wait_finished(killed, tmp_path)
    assert rc == 1 and "stopped by signal 15" in err
    _, rc, err = status(tmp_path / "never.json", tmp_path)
    assert rc == 1 and "never started" in err
    refused = job("start", "--job", str(tmp_path / "j.json"))
    assert refused.returncode == 2 and "start needs -- and the command" in refused.stderr
