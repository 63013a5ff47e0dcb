"""host_base's gpu_session_files module (roles/host_base/library; model_server's library links to it),
run by ansible-playbook on this machine: what it makes and writes, what it leaves alone, and the links
it refuses."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_session.paths import ASSETS

OWNER = "nobody"
GROUP = "nogroup"


def apply(tmp_path: Path, directories: list[dict], files: list[dict], owner: str = OWNER, check: bool = False, **more) -> dict:
    """One gpu_session_files task (with `more` of its arguments) through ansible-playbook -vvv (in
    check mode when asked): its result (changed, made, created, written, msg) and, as "output",
    what ansible-playbook printed."""
    args = {"owner": owner, "group": GROUP, "directories": directories, "files": files, **more}
    task = {"gpu_session_files": args, "check_mode": check}
    play = [{"hosts": "localhost", "gather_facts": False, "tasks": [{**task, "register": "r", "ignore_errors": True},
                                                                    {"ansible.builtin.copy": {"content": "{{ r | to_json }}", "dest": str(tmp_path / "r.json")}}]}]  # fmt: skip
    (tmp_path / "play.yml").write_text(json.dumps(play))
    env = {
        **os.environ,
        "ANSIBLE_LIBRARY": str(ASSETS / "roles" / "host_base" / "library"),
        "ANSIBLE_LOCALHOST_WARNING": "False",
        "ANSIBLE_CALLBACK_RESULT_FORMAT": "yaml",  # as ansible.cfg says, from wherever pytest runs
    }
    done = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-vvv", "-c", "local", "-i", "localhost,", "-e", f"ansible_python_interpreter={sys.executable}",
         str(tmp_path / "play.yml")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return {**json.loads((tmp_path / "r.json").read_text()), "output": done.stdout + done.stderr}


def owned(path: Path) -> tuple[str, int]:
    st = path.lstat()
    return pwd.getpwuid(st.st_uid).pw_name, st.st_mode & 0o7777


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_makes_writes_then_leaves_alone_and_puts_right_what_drifted(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    dirs = [{"path": str(root / "bin"), "mode": "0750"}, {"path": str(root / "bin" / "sub"), "mode": "0700"},
            {"path": str(root / "missing" / "pid"), "mode": "0750"}]  # fmt: skip
    # As the role passes a helper: the file lookup's text, which Ansible does not template again.
    (tmp_path / "a.py").write_text("print('{{ not a template }}')\n")
    looked_up = f"{{{{ lookup('ansible.builtin.file', '{tmp_path / 'a.py'}', rstrip=false) }}}}"
    files = [
        {"dest": str(root / "bin" / "a.py"), "mode": "0640", "content": looked_up},
        {"dest": str(root / "bin" / "run"), "mode": "0750", "content": "#!/bin/sh\nexec true"},
        {"dest": str(root / "bin" / "root.sh"), "mode": "0644", "content": "x\n", "owner": "root", "group": "root"},
    ]
    first = apply(tmp_path, dirs, files)
    assert first["changed"] and first["made"] == [d["path"] for d in dirs] and first["written"] == [f["dest"] for f in files]
    assert first["created"] == first["made"]
    assert owned(root / "bin") == (OWNER, 0o750) and owned(root / "bin" / "sub") == (OWNER, 0o700)
    assert owned(root / "missing") == ("root", 0o755) and owned(root / "missing" / "pid") == (OWNER, 0o750)  # as mkdir -p
    assert owned(root / "bin" / "a.py") == (OWNER, 0o640) and owned(root / "bin" / "run") == (OWNER, 0o750)
    assert (root / "bin" / "a.py").read_text() == "print('{{ not a template }}')\n"  # byte for byte, never templated
    assert (root / "bin" / "run").read_text() == "#!/bin/sh\nexec true"
    assert owned(root / "bin" / "root.sh") == ("root", 0o644)  # an item's own owner
    assert sorted(p.name for p in (root / "bin").iterdir()) == ["a.py", "root.sh", "run", "sub"]  # no temporary file left

    again = apply(tmp_path, dirs, files)
    assert not again["changed"] and again["made"] == [] and again["written"] == []

    (root / "bin" / "sub").chmod(0o755)
    os.chown(root / "bin" / "run", 0, 0)
    files[0]["content"] = "print('new')\n"
    drifted = apply(tmp_path, dirs, files)
    assert drifted["changed"] and drifted["made"] == [str(root / "bin" / "sub")] and drifted["created"] == []  # put right
    assert drifted["written"] == [str(root / "bin" / "a.py"), str(root / "bin" / "run")]
    assert owned(root / "bin" / "sub") == (OWNER, 0o700) and owned(root / "bin" / "run") == (OWNER, 0o750)
    assert (root / "bin" / "a.py").read_text() == "print('new')\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_links_and_the_wrong_kind_are_refused_and_never_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    (target / "precious").write_text("keep")
    root = tmp_path / "root"
    root.mkdir()
    (root / "bin").symlink_to(target)
    refused = apply(tmp_path, [{"path": str(root / "bin"), "mode": "0750"}], [])
    assert refused.get("failed") and "symbolic link" in refused["msg"] and str(root / "bin") in refused["msg"]
    assert owned(target) == ("root", 0o755)  # not chowned through the link

    (root / "bin").unlink()
    (root / "bin").mkdir()
    (root / "bin" / "a.py").symlink_to(target / "precious")
    refused = apply(tmp_path, [], [{"dest": str(root / "bin" / "a.py"), "mode": "0640", "content": "x"}])
    assert refused.get("failed") and "symbolic link" in refused["msg"]
    assert (target / "precious").read_text() == "keep" and owned(target / "precious")[0] == "root"

    (root / "bin" / "a.py").unlink()
    (root / "bin" / "a.py").mkdir()
    refused = apply(tmp_path, [], [{"dest": str(root / "bin" / "a.py"), "mode": "0640", "content": "x"}])
    assert refused.get("failed") and "is not a file" in refused["msg"]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_check_mode_and_bad_arguments_change_nothing(tmp_path):
    d = tmp_path / "d"
    good = {"path": str(d), "mode": "0750"}
    bad_mode = apply(tmp_path, [good], [{"dest": str(d / "f"), "mode": "750x", "content": "x"}])
    assert bad_mode.get("failed") and "not an octal string" in bad_mode["msg"] and not d.exists()  # the folder before it too
    unquoted = apply(tmp_path, [{"path": str(d), "mode": 750}], [])  # YAML's unquoted 0750 comes as a number
    assert unquoted.get("failed") and "quote it" in unquoted["msg"] and not d.exists()
    no_dest = apply(tmp_path, [], [{"mode": "0640", "content": "x"}])
    assert no_dest.get("failed") and "dest" in no_dest["msg"]
    stranger = apply(tmp_path, [good], [], owner="nosuchuser")
    assert stranger.get("failed") and "no such user or group" in stranger["msg"] and not d.exists()
    stranger_item = apply(tmp_path, [{**good, "group": "nosuchgroup"}], [])
    assert stranger_item.get("failed") and "nosuchgroup" in stranger_item["msg"] and not d.exists()
    checked = apply(tmp_path, [good], [{"dest": str(d / "f"), "mode": "0640", "content": "x"}], check=True)
    assert checked["changed"] and checked["made"] == [str(d)] and not d.exists()


@pytest.fixture
def host_log():
    """What modules log on this machine: AnsibleModule logs each run's arguments to syslog (to the
    journal where python's systemd is installed, which it is not here), whose socket, /dev/log, this
    bins where there is none. A function that returns what has been logged since."""
    if os.path.exists("/dev/log"):
        pytest.skip("/dev/log is this machine's own logger's: not ours to read")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("/dev/log")
    sock.setblocking(False)

    def logged() -> str:
        lines = []
        while True:
            try:
                lines.append(sock.recv(65536).decode(errors="replace"))
            except BlockingIOError:
                return "\n".join(lines)

    try:
        yield logged
    finally:
        sock.close()
        os.unlink("/dev/log")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_secret_is_written_like_a_file_and_never_logged_or_shown(tmp_path, host_log):
    key = "sk-" + secrets.token_hex(16)
    root = tmp_path / "root"
    root.mkdir()
    plain = {"dest": str(root / "run"), "mode": "0750", "content": "#!/bin/sh\n"}
    dest = root / "model-server.env"
    secret = {"secret_dest": str(dest), "secret_mode": "0640", "secret_content": f"# the secrets\nGPU_SESSION_API_KEY={key}\n"}
    first = apply(tmp_path, [], [plain], **secret)
    assert first["changed"] and first["written"] == [plain["dest"], str(dest)]
    assert dest.read_text() == f"# the secrets\nGPU_SESSION_API_KEY={key}\n" and owned(dest) == (OWNER, 0o640)
    # The host's log has the run (the capture works) but not the key: not even in a task without
    # no_log, as this one is (the role's task sets it too, and then the module logs nothing).
    logged = host_log()
    assert "gpu_session_files" in logged and "secret_content=NOT_LOGGING_PARAMETER" in logged, logged
    assert key not in logged
    # -vvv prints the module's arguments (its "invocation"): the secret's content masked there, a file's not.
    assert "secret_content: VALUE_SPECIFIED_IN_NO_LOG_PARAMETER" in first["output"] and "#!/bin/sh" in first["output"]
    assert key not in json.dumps(first)  # the result, and ansible-playbook -vvv's output

    again = apply(tmp_path, [], [plain], **secret)
    assert not again["changed"] and again["written"] == []
    no_content = apply(tmp_path, [], [], secret_dest=str(dest))
    assert no_content.get("failed") and "secret_content" in no_content["msg"]
    unquoted = apply(tmp_path, [], [], **{**secret, "secret_mode": 640})  # YAML's unquoted 0640 comes as a number
    assert unquoted.get("failed") and "quote it" in unquoted["msg"] and key not in json.dumps(unquoted)
