"""What a cancelled Ansible run leaves: each of Ansible's workers calls setsid, so killing
ansible-playbook's process group (what ansible-runner does on cancel) leaves a worker in the middle
of a task running, and, its playbook gone, blocked for ever on the queue its result goes to.
end_run_processes ends every process that names the run's private folder, with its process group."""

import os
import signal
import subprocess
import sys
import time

from gpu_session.host.ansible import end_run_processes

# Like a worker: its own session (setsid), a child in its group (a task's ssh), the run's folder on
# its command line (inherited from ansible-playbook's -i and -e); prints the child's pid.
WORKER = "import subprocess, sys, time; print(subprocess.Popen(['sleep', '300']).pid, flush=True); time.sleep(300)"


def alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1][0]  # noqa: SIM115
    except FileNotFoundError:
        return False
    return state != "Z"


def start(folder) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", WORKER, "-i", f"{folder}/inventory/hosts"], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    return proc, int(proc.stdout.readline())


def test_a_worker_left_by_a_cancelled_run_is_ended_with_its_group_and_no_other_run_is_touched(tmp_path):
    ours, other = tmp_path / "ansible-1-abc", tmp_path / "ansible-1-abcd"  # a prefix of the other's name
    worker, child = start(ours)
    bystander, its_child = start(other)
    try:
        assert end_run_processes(ours) == [worker.pid]
        assert worker.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), "the worker's own child (its group) is left"
        assert bystander.poll() is None and alive(its_child)
        assert end_run_processes(ours) == []  # nothing left: a second call ends nothing
    finally:
        for proc in (worker, bystander):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
