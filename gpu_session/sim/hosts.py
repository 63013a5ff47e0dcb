"""Real hosts for simulated instances.

As root, each instance gets its own network namespace on a private bridge (so its 127.0.0.1 is its
own, reachable from the controller only through SSH, as on a cloud), its own mount namespace with
copy-on-write overlays of /etc, /usr and /var (what a role installs or configures stays in the host),
private /opt, /home, /root and tmpfs /tmp, /run, /dev/shm, its own PID and UTS namespaces
(host_init.py is PID 1), and an sshd. Terminate kills PID 1, which ends every process of
the host, deletes the namespace and removes the host's files.

Without root, hosts fall back to sshd on loopback ports running as the current user: no isolation,
and the simulator says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpu_session.errors import our_command
from gpu_session.local.daemon import alive

log = logging.getLogger("gpu_session.sim.hosts")

RUN_DIR = Path("/run/gpu-session-sim")
PREFIX = "gss"  # names of our namespaces, bridges and veths: gss<k>...
SSHD = "/usr/sbin/sshd"
# Copy-on-write layers over the controller's own: what a host changes there stays in the host.
OVERLAYS = ("etc", "usr", "var")
# Where a host may write through cloud-init: its private mounts (/bin, /sbin, /lib lead into /usr).
PRIVATE_ROOTS = ("/etc", "/usr", "/var", "/bin", "/sbin", "/lib", "/opt", "/home", "/root", "/tmp", "/run", "/dev/shm")
# Where clouds mount volumes, absent from a usual root: Lambda's /lambda/nfs/<name>, RunPod's /workspace
# (our pods' volumeMountPath) and /runpod-volume (the SDK's default). A mount needs an existing
# directory, and the host's root is the controller's own (only the layers above are private), so
# the simulator creates these top-level directories on the controller, empty (the only trace it
# leaves there), and gives each isolated host a private, empty folder over each: hosts never share
# them, whether or not a volume is mounted inside.
MOUNT_TOPS = ("/lambda", "/workspace", "/runpod-volume")
# Where a volume may be mounted in a host: inside those, or inside the host's private /opt, /home, /root.
MOUNT_ROOTS = (*MOUNT_TOPS, "/opt", "/home", "/root")


class HostError(RuntimeError):
    """A simulated host failed to start."""


@dataclass
class HostSpec:
    host_id: str
    user: str  # "ubuntu" (Lambda) or "root" (RunPod)
    authorized_keys: list[str]
    gpus: list[tuple[str, int]]  # (name, memory MiB) per GPU, for the simulated nvidia-smi
    env: dict[str, str] = field(default_factory=dict)  # PID 1's environment, also set for SSH sessions
    extra_ports: list[int] = field(default_factory=list)  # more ports sshd listens on (RunPod mapping)
    files: list[dict] = field(default_factory=list)  # cloud-init write_files, content decoded
    hostname: str | None = None
    driver: tuple[str, str] = ("", "")  # (driver version, CUDA version) the simulated nvidia-smi reports
    # Volumes: (folder on the controller, path in the host), bind-mounted read-write (isolated hosts only).
    mounts: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Host:
    host_id: str
    address: str
    user: str
    dir: Path
    netns: str | None
    proc: subprocess.Popen | None = None
    port: int = 22
    veth: str | None = None  # the controller's end of the host's link


def can_isolate() -> bool:
    return os.geteuid() == 0 and all(shutil.which(t) for t in ("ip", "unshare", "mount")) and Path(SSHD).exists()


def _run(*args: str) -> str:
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode != 0:
        raise HostError(f"{' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def _wait_port(address: str, port: int, deadline: float, proc: subprocess.Popen | None, logfile: Path) -> None:
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            with socket.create_connection((address, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
    raise HostError(f"sshd on {address}:{port} did not come up:\n{tail}")


def nvidia_smi_script(gpus: list[tuple[str, int]], driver: tuple[str, str]) -> str:
    """A stand-in nvidia-smi that reports the instance type's GPUs as real ones do (memory.total in
    MiB as the GPU reports it, a driver version that compares) and says it is simulated where no
    query reads it: in its own text and in the table's header."""
    return f"""#!/usr/bin/env python3
# SIMULATED nvidia-smi (gpu-session simulator): no GPU is attached to this host.
import sys
GPUS = {gpus!r}
DRIVER, CUDA = {driver!r}
FIELDS = {{
    "index": lambda i, g: str(i), "name": lambda i, g: g[0], "uuid": lambda i, g: f"GPU-sim-{{i:08d}}",
    "memory.total": lambda i, g: str(g[1]), "memory.used": lambda i, g: "0", "memory.free": lambda i, g: str(g[1]),
    "utilization.gpu": lambda i, g: "0", "driver_version": lambda i, g: DRIVER,
    "count": lambda i, g: str(len(GPUS)), "compute_cap": lambda i, g: "9.0",
}}
UNITS = {{"memory.total": " MiB", "memory.used": " MiB", "memory.free": " MiB", "utilization.gpu": " %"}}
args = sys.argv[1:]
query = next((a.split("=", 1)[1] for a in args if a.startswith("--query-gpu=")), None)
fmt = next((a.split("=", 1)[1] for a in args if a.startswith("--format=")), "")
if "-L" in args or "--list-gpus" in args:
    for i, g in enumerate(GPUS):
        print(f"GPU {{i}}: {{g[0]}} (UUID: GPU-sim-{{i:08d}})")
elif query:
    names = [q.strip() for q in query.split(",")]
    bad = [n for n in names if n not in FIELDS]
    if bad:
        sys.exit(f'Field "{{bad[0]}}" is not a valid field to query.')
    if "noheader" not in fmt:
        print(", ".join(names))
    for i, g in enumerate(GPUS):
        vals = [FIELDS[n](i, g) + ("" if "nounits" in fmt else UNITS.get(n, "")) for n in names]
        print(", ".join(vals))
else:
    print("+-- NVIDIA-SMI (SIMULATED by the gpu-session simulator: no real GPU) --+")
    print(f"| Driver Version: {{DRIVER:<16}} CUDA Version: {{CUDA:<6}}                     |")
    for i, g in enumerate(GPUS):
        print(f"| {{i}}  {{g[0]:<40}} {{0:>6}}MiB / {{g[1]:>6}}MiB   0% |")
    print("+----------------------------------------------------------------------+")
"""


class Hosts:
    """Starts and tears down the simulator's hosts."""

    def __init__(self, state_dir: Path, isolate: bool | None = None, boot_timeout: float = 20.0):
        self.dir = state_dir / "hosts"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.isolated = can_isolate() if isolate is None else isolate
        self.boot_timeout = boot_timeout
        self._hosts: dict[str, Host] = {}
        self._lock = threading.Lock()
        self._next = 0
        self._net_index: int | None = None
        if self.isolated:
            self._net_index = self._claim_network()
            self._uid = self._free_id()
            for top in MOUNT_TOPS:
                Path(top).mkdir(mode=0o755, exist_ok=True)
        else:
            log.warning(
                "simulator is not running as root: hosts are sshd processes on loopback ports, "
                "logging in as the current user, with no network, mount or process isolation"
            )

    # --- network ---------------------------------------------------------------------------

    @property
    def gateway(self) -> str:
        """The controller's address as hosts see it (where the simulator's APIs are reachable from a host)."""
        return f"10.{200 + self._net_index}.0.1" if self.isolated else "127.0.0.1"

    @property
    def _bridge(self) -> str:
        return f"{PREFIX}{self._net_index}br"

    def _claim_network(self) -> int:
        """Pick a free bridge index; reclaim those whose simulator died without cleaning up. Under
        the networks' lock: another simulator starting at once never reads this one's pidfile
        before its pid is in it (and takes it for a dead one's)."""
        with _networks_locked():
            for k, pidfile, _ in _unowned_networks():
                pidfile.write_text(str(os.getpid()))
                pidfile.chmod(0o600)
                self._net_index = k
                br = self._bridge
                _run("ip", "link", "add", br, "type", "bridge")
                _run("ip", "addr", "add", f"{self.gateway}/16", "dev", br)
                _run("ip", "link", "set", br, "up")
                return k
        raise HostError(f"no free simulator network (50 in use): run {our_command('sim --cleanup')}")

    @staticmethod
    def _free_id() -> int:
        used = {int(line.split(":")[2]) for line in Path("/etc/passwd").read_text().splitlines() if line.count(":") >= 3}
        used |= {int(line.split(":")[2]) for line in Path("/etc/group").read_text().splitlines() if line.count(":") >= 3}
        return next(i for i in range(1001, 60000) if i not in used)

    # --- volumes ---------------------------------------------------------------------------

    def volume_owner(self, user: str) -> tuple[int, int]:
        """Who owns a volume's root folder so that `user` in a host can write to it, as on the clouds
        (a Lambda filesystem is the image user's, ubuntu; a RunPod volume is root's): uid and gid."""
        if not self.isolated:
            return os.getuid(), os.getgid()
        return (0, 0) if user == "root" else (self._uid, self._uid)

    @staticmethod
    def mount_refusal(path: str, isolated: bool) -> str | None:
        """Why a volume cannot be mounted at `path` in a host, or None when it can."""
        if not isolated:
            return (
                "the simulator attaches volumes only to isolated hosts (run it as root): its unprivileged "
                "hosts share this machine's filesystem and cannot mount one"
            )
        norm = os.path.normpath(path or "/")
        inside = norm in MOUNT_TOPS or norm.startswith(tuple(r + "/" for r in MOUNT_ROOTS))
        if not path.startswith("/") or norm != path.rstrip("/") or not inside:
            return f"the simulator mounts volumes only under {', '.join(MOUNT_ROOTS)}, not at {path!r}"
        return None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, spec: HostSpec) -> Host:
        for _src, path in spec.mounts:
            refusal = self.mount_refusal(path, self.isolated)
            if refusal:
                raise HostError(refusal)
        with self._lock:
            self._next += 1
            n = self._next
        hd = self.dir / spec.host_id
        hd.mkdir(mode=0o700, parents=True)
        try:
            host = self._start_isolated(spec, hd, n) if self.isolated else self._start_loopback(spec, hd)
        except BaseException:
            self._teardown(Host(spec.host_id, "", spec.user, hd, self._netns_name(spec.host_id) if self.isolated else None))
            raise
        with self._lock:
            self._hosts[spec.host_id] = host
        return host

    def stop(self, host_id: str) -> None:
        with self._lock:
            host = self._hosts.pop(host_id, None)
        if host is not None:
            self._teardown(host)

    def get(self, host_id: str) -> Host | None:
        with self._lock:
            return self._hosts.get(host_id)

    def pids(self, host_id: str) -> list[int]:
        """Every process of the host (for tests that prove a terminate left nothing running)."""
        if self.isolated:
            ns = self._netns_name(host_id)
            try:
                return [int(p) for p in _run("ip", "netns", "pids", ns).split()]
            except HostError:
                if (Path("/run/netns") / ns).exists():
                    raise
                return []  # torn down between the question and the answer: no processes
        return _marked_pids(host_id)

    def close(self) -> None:
        for host_id in list(self._hosts):
            self.stop(host_id)
        if self.isolated and self._net_index is not None:
            cleanup_network(self._net_index)
            (RUN_DIR / f"net{self._net_index}.pid").unlink(missing_ok=True)
            self._net_index = None

    # --- isolated hosts --------------------------------------------------------------------

    def _netns_name(self, host_id: str) -> str:
        return f"{PREFIX}{self._net_index}-{host_id[:12]}"

    def _prepare_fs(self, spec: HostSpec, hd: Path, home: str) -> None:
        """The host's private layers: overlay upper dirs for /etc, /usr, /var (written here before
        boot), and empty /opt, /home, /root."""
        for layer in OVERLAYS:
            (hd / layer / "upper").mkdir(parents=True, mode=0o755)
            (hd / layer / "work").mkdir(mode=0o755)
        for d in ("opt", "home", "root", *(t.lstrip("/") for t in MOUNT_TOPS)):
            (hd / d).mkdir(mode=0o755)
        for i in range(len(spec.mounts)):  # where volumes are staged before they reach their paths (host_init)
            (hd / "volumes" / str(i)).mkdir(parents=True, mode=0o700)
        (hd / "root").chmod(0o700)
        etc, usr = hd / "etc" / "upper", hd / "usr" / "upper"
        passwd = Path("/etc/passwd").read_text()
        group = Path("/etc/group").read_text()
        shadow = Path("/etc/shadow").read_text() if Path("/etc/shadow").exists() else ""
        uid = gid = 0
        if spec.user != "root":
            uid = gid = self._uid
            passwd += f"{spec.user}:x:{uid}:{gid}:{spec.user}:{home}:/bin/bash\n"
            group += f"{spec.user}:x:{gid}:\n"
            shadow += f"{spec.user}:*:19000:0:99999:7:::\n"
            (etc / "sudoers.d").mkdir(mode=0o755)
            sudoers = etc / "sudoers.d" / spec.user
            sudoers.write_text(f"{spec.user} ALL=(ALL) NOPASSWD:ALL\n")
            sudoers.chmod(0o440)
        # The host's own name resolves locally, as on cloud images (sudo looks it up on every call).
        hosts = Path("/etc/hosts").read_text() + f"127.0.1.1 {spec.hostname or spec.host_id[:12]}\n"
        files = (("passwd", passwd, 0o644), ("group", group, 0o644), ("shadow", shadow, 0o640), ("hosts", hosts, 0o644))
        for name, text, mode in files:
            (etc / name).write_text(text)
            (etc / name).chmod(mode)
        # The user's home, on the private mount that will be /home or /root.
        home_dir = hd / ("root" if spec.user == "root" else f"home/{spec.user}")
        ssh_dir = home_dir / ".ssh"
        ssh_dir.mkdir(parents=True, mode=0o700)
        (ssh_dir / "authorized_keys").write_text("".join(k.strip() + "\n" for k in spec.authorized_keys))
        (ssh_dir / "authorized_keys").chmod(0o600)
        for p in (home_dir, ssh_dir, ssh_dir / "authorized_keys"):
            os.chown(p, uid, gid)
        # sshd: its own configuration and host key.
        etc_ssh = etc / "ssh"
        etc_ssh.mkdir(mode=0o755)
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", spec.host_id, "-f", str(etc_ssh / "ssh_host_ed25519_key"))
        ports = "".join(f"Port {p}\n" for p in [22, *spec.extra_ports])
        setenv = " ".join(f'"{k}={v}"' for k, v in spec.env.items())
        (etc_ssh / "sshd_config").write_text(
            f"{ports}ListenAddress 0.0.0.0\n"
            "HostKey /etc/ssh/ssh_host_ed25519_key\n"
            "PidFile /run/sshd.pid\n"
            "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nAuthorizedKeysFile .ssh/authorized_keys\n"
            "AllowTcpForwarding yes\nPrintMotd no\nMaxStartups 50:30:100\n"
            "Subsystem sftp internal-sftp\n" + (f"SetEnv {setenv}\n" if setenv else "")
        )
        (etc_ssh / "sshd_config").chmod(0o600)
        (usr / "local" / "bin").mkdir(parents=True)
        smi = usr / "local" / "bin" / "nvidia-smi"
        smi.write_text(nvidia_smi_script(spec.gpus, spec.driver))
        smi.chmod(0o755)

    def _start_isolated(self, spec: HostSpec, hd: Path, n: int) -> Host:
        home = "/root" if spec.user == "root" else f"/home/{spec.user}"
        self._prepare_fs(spec, hd, home)
        ns = self._netns_name(spec.host_id)
        address = f"10.{200 + self._net_index}.{1 + n // 250}.{2 + n % 250}"
        veth, peer = f"{PREFIX}{self._net_index}v{n}", f"{PREFIX}{self._net_index}p{n}"
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer, "netns", ns)
        _run("ip", "link", "set", veth, "master", self._bridge, "up")
        _run("ip", "-n", ns, "addr", "add", f"{address}/16", "dev", peer)
        _run("ip", "-n", ns, "link", "set", peer, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "route", "add", "default", "via", self.gateway)
        uid = 0 if spec.user == "root" else self._uid
        files = []
        for f in spec.files:
            if not f["path"].startswith(tuple(p + "/" for p in PRIVATE_ROOTS)):
                log.warning(
                    "host %s: write_files path %s is outside the host's private filesystem; skipped", spec.host_id, f["path"]
                )
                continue
            files.append({**f, "owner": f.get("owner") or [uid if f["path"].startswith(home) else 0] * 2})
        cfg = {
            "host_id": spec.host_id,
            "hostname": spec.hostname or spec.host_id[:12],
            "log": str(hd / "host.log"),
            "dir": str(hd),
            "overlays": list(OVERLAYS),
            "binds": [["opt", "/opt"], ["home", "/home"], ["root", "/root"], *([t.lstrip("/"), t] for t in MOUNT_TOPS)],
            "volumes": [[src, path] for src, path in spec.mounts],
            "tmpfs": [["/tmp", "1777"], ["/run", "0755"], ["/dev/shm", "1777"]],
            "files": files,
            "sshd": [SSHD, "-D", "-e", "-f", "/etc/ssh/sshd_config"],
        }
        (hd / "init.json").write_text(json.dumps(cfg))
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": home, **spec.env}
        init = Path(__file__).with_name("host_init.py")
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "unshare",
                "--mount",
                "--uts",
                "--pid",
                "--fork",
                "--mount-proc",
                "--propagation",
                "private",
                "/usr/bin/python3",
                str(init),
                str(hd / "init.json"),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        host = Host(spec.host_id, address, spec.user, hd, ns, proc, veth=veth)
        try:
            _wait_port(address, 22, time.monotonic() + self.boot_timeout, proc, hd / "host.log")
        except BaseException:
            self._teardown(host)
            raise
        return host

    # --- loopback fallback -----------------------------------------------------------------

    def _start_loopback(self, spec: HostSpec, hd: Path) -> Host:
        port = spec.extra_ports[0] if spec.extra_ports else _free_port()
        key = hd / "ssh_host_ed25519_key"
        for f in spec.files:  # honour host keys delivered by cloud-init; nothing else can be placed
            if f["path"] == "/etc/ssh/ssh_host_ed25519_key":
                key.write_text(f["content"])
                key.chmod(0o600)
        if not key.exists():
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", spec.host_id, "-f", str(key))
        (hd / "authorized_keys").write_text("".join(k.strip() + "\n" for k in spec.authorized_keys))
        (hd / "authorized_keys").chmod(0o600)
        env = {**spec.env, "GPU_SESSION_SIM_HOST": spec.host_id}
        setenv = " ".join(f'"{k}={v}"' for k, v in env.items())
        (hd / "sshd_config").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {key}\nPidFile {hd}/sshd.pid\n"
            f"AuthorizedKeysFile {hd}/authorized_keys\nStrictModes no\nUsePAM no\n"
            "PasswordAuthentication no\nAllowTcpForwarding yes\nSubsystem sftp internal-sftp\n"
            f"SetEnv {setenv}\n"
        )
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        logf = open(hd / "host.log", "ab")  # noqa: SIM115 - handed to sshd, closed below
        proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(hd / "sshd_config")],
            env={**os.environ, **env},
            stdout=logf,
            stderr=logf,
            start_new_session=True,
        )
        logf.close()
        host = Host(spec.host_id, "127.0.0.1", getpass.getuser(), hd, None, proc, port)
        try:
            _wait_port("127.0.0.1", port, time.monotonic() + self.boot_timeout, proc, hd / "host.log")
        except BaseException:
            self._teardown(host)
            raise
        return host

    # --- teardown --------------------------------------------------------------------------

    def _teardown(self, host: Host) -> None:
        if host.netns:
            for _ in range(50):
                if not (Path("/run/netns") / host.netns).exists():
                    break
                pids = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True).stdout.split()
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.02)
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
            if host.veth:  # normally gone with the namespace; not always at once
                subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
        else:
            for pid in _marked_pids(host.host_id):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if host.proc is not None:
            try:
                host.proc.kill()
                host.proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(host.dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked_pids(host_id: str) -> list[int]:
    """Processes that carry the host's marker in their environment (loopback hosts only)."""
    marker = f"GPU_SESSION_SIM_HOST={host_id}".encode()
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "environ").read_bytes().split(b"\0"):
                    found.append(int(p.name))
            except OSError:
                pass
    return found


@contextlib.contextmanager
def _networks_locked():
    """One simulator at a time claims or reclaims a network (RUN_DIR/networks.lock, an flock)."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(RUN_DIR / "networks.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _owner_alive(pidfile: Path) -> bool:
    """Whether the simulator whose pid `pidfile` holds still runs (False when there is none)."""
    try:
        owner = int(pidfile.read_text() or "0")
    except (OSError, ValueError):
        return False
    return alive(owner)  # a zombie (killed, not yet reaped) is not alive: its network is free


def _unowned_networks():
    """Each network index no running simulator owns, (k, its pidfile, the hosts removed of it), once
    its leftovers (a dead simulator's, or ones with no pidfile at all) are removed. Under _networks_locked."""
    for k in range(50):
        pidfile = RUN_DIR / f"net{k}.pid"
        if _owner_alive(pidfile):
            continue
        pidfile.unlink(missing_ok=True)
        yield k, pidfile, cleanup_network(k)


def reclaim_networks() -> tuple[int, int]:
    """Remove the networks and hosts of simulators that are no longer running (`invoke sim --cleanup`):
    how many networks had leftovers, and how many hosts they had."""
    with _networks_locked():
        removed = [hosts for _, _, hosts in _unowned_networks() if hosts is not None]
    return len(removed), sum(removed)


def cleanup_network(k: int) -> int | None:
    """Remove every namespace and the bridge of simulator network k (a dead simulator's leftovers):
    how many hosts (namespaces) it removed; None when it removed nothing (nothing of it was there)."""
    netns = Path("/run/netns")
    hosts = removed_links = 0
    for ns in netns.iterdir() if netns.exists() else []:
        if ns.name.startswith(f"{PREFIX}{k}-"):
            pids = subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            hosts += subprocess.run(["ip", "netns", "del", ns.name], capture_output=True).returncode == 0
    # A veth can outlive its namespace's deletion for a while; its name would then block a new host.
    shown = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for line in shown.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(f"{PREFIX}{k}v"):
            removed_links += subprocess.run(["ip", "link", "del", name], capture_output=True).returncode == 0
    removed_links += subprocess.run(["ip", "link", "del", f"{PREFIX}{k}br"], capture_output=True).returncode == 0
    return hosts if hosts or removed_links else None
