"""After the scrub: the session's files, processes, port, user and every canary are gone, and the
receipt the role returned says so."""

import json
import os
from pathlib import Path

import testinfra.utils.ansible_runner

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"]).get_hosts("all")
CANARY = (Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "canary").read_text().strip()
REMOVED = ["/opt/gpu-session", "/dev/shm/gpu-session", "/run/gpu-session", "/root/.bash_history",
           "/root/.cache/huggingface", "/etc/profile.d/gpu-session-no-history.sh", "/tmp/scratch", "/tmp/work"]  # fmt: skip


def test_the_session_files_are_gone(host):
    for path in REMOVED:
        assert not host.file(path).exists, path


def test_no_process_port_or_user_is_left(host):
    assert not host.socket("tcp://127.0.0.1:8000").is_listening
    assert host.run("pgrep -f 'http[.]server 8000|slee[p] 3600'").rc == 1  # brackets: the pattern matches not its own shell
    assert not host.user("gpu-session").exists


def test_no_canary_is_left_anywhere_a_session_writes(host):
    with host.sudo():
        found = host.run("grep -rlsF -e %s /opt /home /root /tmp /var/tmp /var/log /dev/shm /run /etc /srv", CANARY)
    assert found.stdout == "" and found.rc == 1


def test_the_receipt_names_what_was_removed_and_verified():
    receipt = json.loads((Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "receipt.json").read_text())
    assert receipt["ok"] is True and receipt["finished_at"]
    removed = set(receipt["removed"])
    assert {"/opt/gpu-session", "/dev/shm/gpu-session", "/run/gpu-session", "/root/.bash_history"} <= removed
    assert {"/tmp/scratch", "/tmp/work"} <= removed  # the service user's, outside the data root
    assert receipt["stopped_services"] == ["gpu-session-model-server", "gpu-session-lease"]
    assert receipt["verified"]["canaries_checked"] == 1 and receipt["verified"]["nothing_listening_on"] == 8000
    assert CANARY not in json.dumps(receipt)
