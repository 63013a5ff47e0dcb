#!/usr/bin/python
# A role module (Ansible loads a role's library/ for its tasks): folders and small files in one
# module run, where a file, copy or template task per item costs one module run over SSH each
# (README, Benchmark: configuring a host), on every converge of a fresh host. host_base's, and
# model_server's through a link (roles/model_server/library), so that each role works on its own.

from __future__ import annotations

DOCUMENTATION = r"""
module: gpu_session_files
short_description: Make folders and write small files, in one module run
description:
  - Makes each folder of O(directories), then writes each file of O(files), each with its own mode,
    owned by O(owner) and O(group) unless the item names its own.
  - A folder or file already right (content, owner, group, mode) is left alone; a file is written
    through a temporary file in its folder and renamed into place, so no reader sees half of it.
  - A symbolic link in the place of a folder or file it makes, or a folder where a file goes (or a
    file where a folder goes), is refused and never followed; nothing after it is changed. Links in
    the folders above them are followed, as the file, copy and template modules follow them.
  - One secret file goes in O(secret_dest) and O(secret_content), a parameter of its own because
    AnsibleModule logs a list's items as their repr, where an item's no_log content (its newlines
    escaped) would not be masked, into the host's journal or syslog; O(secret_content) is logged as
    C(NOT_LOGGING_PARAMETER) and masked in results. Set the task's C(no_log) too, which keeps its
    result out of the controller's output and events and the module from logging at all.
options:
  owner: {description: The owner's user name., type: str, required: true}
  group: {description: The owner's group name., type: str, required: true}
  directories:
    description: Folders (missing parents made as mkdir -p makes them); C(path), C(mode) (octal string), and C(owner), C(group) optionally.
    type: list
    elements: dict
    default: []
  files:
    description: Files, written in folders already there; C(dest), C(content) (text), C(mode) (octal string), and C(owner), C(group) optionally.
    type: list
    elements: dict
    default: []
  secret_dest: {description: Where the secret file goes (written after O(files))., type: path}
  secret_content: {description: The secret file's content (text)., type: str}
  secret_mode: {description: The secret file's mode (octal string)., type: raw, default: "0600"}
"""

RETURN = r"""
made: {description: The folders made or put right., type: list, returned: always}
created: {description: The folders of those that were not there before (made, not put right)., type: list, returned: always}
written: {description: The files written or put right., type: list, returned: always}
"""

import grp  # noqa: E402
import os  # noqa: E402
import pwd  # noqa: E402
import re  # noqa: E402
import stat  # noqa: E402
import tempfile  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

# An item's own owner and group, else the module's.
OWNED = {"owner": {"type": "str"}, "group": {"type": "str"}}


class Refused(Exception):
    pass


def _existing(path: str, kind: int):
    """The lstat of path, None when absent; Refused for a link or another kind of thing."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise Refused(f"{path} is a symbolic link, where gpu-session writes its own: remove it and converge again")
    if stat.S_IFMT(st.st_mode) != kind:
        want = "folder" if kind == stat.S_IFDIR else "file"
        raise Refused(f"{path} is not a {want}, where gpu-session makes a {want}: remove it and converge again")
    return st


def _right(st, uid: int, gid: int, mode: int) -> bool:
    return st.st_uid == uid and st.st_gid == gid and stat.S_IMODE(st.st_mode) == mode


def make_directory(path: str, uid: int, gid: int, mode: int, check: bool) -> str:
    """What was done: "created", "put right" or "" (it was right)."""
    st = _existing(path, stat.S_IFDIR)
    if st is not None and _right(st, uid, gid, mode):
        return ""
    if not check:
        if st is None:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)  # missing parents root's, as mkdir -p makes them
            os.mkdir(path, 0o700)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    return "created" if st is None else "put right"


def _same_content(dest: str, st, content: bytes) -> bool:
    """Whether the regular file dest (lstat st) holds content: opened without following a link or
    waiting on a FIFO put there since the lstat, checked to be that file, read no further than needed."""
    if st.st_size != len(content):
        return False
    try:
        fd = os.open(dest, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        now = os.fstat(f.fileno())
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False
        return f.read(len(content) + 1) == content


def write_file(dest: str, content: bytes, uid: int, gid: int, mode: int, check: bool) -> bool:
    """Whether the file was written or put right."""
    st = _existing(dest, stat.S_IFREG)
    if st is not None and _right(st, uid, gid, mode) and _same_content(dest, st, content):
        return False
    if not check:
        fd, tmp = tempfile.mkstemp(prefix=".gpu-session-", dir=os.path.dirname(dest))
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchown(f.fileno(), uid, gid)
                os.fchmod(f.fileno(), mode)
                f.write(content)
            os.replace(tmp, dest)
        except BaseException:
            os.unlink(tmp)
            raise
    return True


def _mode(module: AnsibleModule, mode) -> int:
    """An octal string such as "0750": an unquoted YAML 0750 arrives as the number 488, its base lost."""
    if not isinstance(mode, str) or not re.fullmatch(r"0?[0-7]{3,4}", mode):
        module.fail_json(msg=f"mode {mode!r} is not an octal string such as '0750' (quote it in YAML)")
    return int(mode, 8)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "owner": {"type": "str", "required": True},
            "group": {"type": "str", "required": True},
            "directories": {
                "type": "list",
                "elements": "dict",
                "default": [],
                "options": {"path": {"type": "path", "required": True}, "mode": {"type": "raw", "required": True}, **OWNED},
            },
            "files": {
                "type": "list",
                "elements": "dict",
                "default": [],
                "options": {
                    "dest": {"type": "path", "required": True},
                    "content": {"type": "str", "required": True},
                    "mode": {"type": "raw", "required": True},
                    **OWNED,
                },
            },
            "secret_dest": {"type": "path"},
            "secret_content": {"type": "str", "no_log": True},
            "secret_mode": {"type": "raw", "default": "0600"},
        },
        required_together=[("secret_dest", "secret_content")],
        supports_check_mode=True,
    )
    p = module.params

    def ids(item: dict) -> tuple[int, int]:
        try:
            return pwd.getpwnam(item["owner"] or p["owner"]).pw_uid, grp.getgrnam(item["group"] or p["group"]).gr_gid
        except KeyError as e:
            module.fail_json(msg=f"no such user or group on the host: {e}")

    # Every owner and mode checked before anything changes: bad input changes nothing.
    directories = [(d["path"], *ids(d), _mode(module, d["mode"])) for d in p["directories"]]
    files = [(f["dest"], f["content"].encode(), *ids(f), _mode(module, f["mode"])) for f in p["files"]]
    if p["secret_dest"]:
        uid, gid = ids({"owner": None, "group": None})  # the module's
        files.append((p["secret_dest"], p["secret_content"].encode(), uid, gid, _mode(module, p["secret_mode"])))
    made, created, written = [], [], []
    try:
        for path, uid, gid, mode in directories:
            done = make_directory(path, uid, gid, mode, module.check_mode)
            if done:
                made.append(path)
            if done == "created":
                created.append(path)
        for dest, content, uid, gid, mode in files:
            if write_file(dest, content, uid, gid, mode, module.check_mode):
                written.append(dest)
    except (Refused, OSError) as e:
        module.fail_json(msg=str(e), made=made, created=created, written=written)
    module.exit_json(changed=bool(made or written), made=made, created=created, written=written)


if __name__ == "__main__":
    main()
