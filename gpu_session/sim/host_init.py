"""PID 1 of a simulated instance: private mounts, cloud-init files, sshd, and reaping.

Runs under the system python3 inside fresh mount, PID and network namespaces (see hosts.py), so it
imports nothing but the standard library. Killing this process ends the PID namespace and with it
every process the session started on the host, exactly as a VM or container stops.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

STAGE = "/mnt"


def mount(args: list[str]) -> None:
    subprocess.run(["mount", *args], check=True)


def write_files(files: list[dict]) -> None:
    """cloud-init `write_files`: path, content (already decoded), permissions, owner (uid:gid)."""
    for f in files:
        path = f["path"]
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        with open(path, "wb") as out:
            out.write(f["content"].encode("latin-1"))
        os.chmod(path, int(f.get("permissions", "0644"), 8))
        uid, gid = f.get("owner", [0, 0])
        os.chown(path, uid, gid)


def main() -> None:
    with open(sys.argv[1]) as fh:
        cfg = json.load(fh)
    log = open(cfg["log"], "ab", buffering=0)  # noqa: SIM115 - lives as long as the host; opened before /root is covered
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    # The host's folder may lie under a path about to be covered (/tmp, /root): stage it on /mnt
    # first, bind from there, then drop the stage so the host does not see its own plumbing.
    mount(["--bind", cfg["dir"], STAGE])
    # Volumes (folders of the controller's, anywhere, perhaps under a path covered below) are staged
    # too, then bound at their paths once the private layers are in place.
    volumes = cfg.get("volumes") or []
    for i, (src, _path) in enumerate(volumes):
        mount(["--bind", src, f"{STAGE}/volumes/{i}"])
    for layer in cfg["overlays"]:
        mount(["-t", "overlay", "overlay", "-o",
               f"lowerdir=/{layer},upperdir={STAGE}/{layer}/upper,workdir={STAGE}/{layer}/work", f"/{layer}"])  # fmt: skip
    for src, dst in cfg["binds"]:
        mount(["--bind", f"{STAGE}/{src}", dst])
    for i, (_src, path) in enumerate(volumes):
        os.makedirs(path, mode=0o755, exist_ok=True)  # in the host's private layers (hosts.MOUNT_ROOTS)
        mount(["--bind", f"{STAGE}/volumes/{i}", path])
    for dst, mode in cfg["tmpfs"]:
        mount(["-t", "tmpfs", "-o", f"mode={mode}", "tmpfs", dst])
    subprocess.run(["umount", "--lazy", STAGE], check=True)
    socket.sethostname(cfg["hostname"])  # our own UTS namespace
    write_files(cfg["files"])
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    sshd = subprocess.Popen(cfg["sshd"])
    print(f"host {cfg['host_id']}: sshd pid {sshd.pid}", flush=True)

    def stop(_sig, _frame):
        os.kill(-1, signal.SIGKILL)  # inside our PID namespace: every process of this host
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:  # reap orphans, as an init must
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(0.5)


if __name__ == "__main__":
    main()
