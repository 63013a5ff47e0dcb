"""The simulator's state: accounts, instances, SSH keys, capacity, faults and rate limits.

Both cloud APIs are views over this one world. Instances move through their cloud's status
timeline on background threads; their hosts are real (hosts.py).
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import shutil
import string
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import catalog
from .hosts import HostError, Hosts, HostSpec

log = logging.getLogger("gpu_session.sim")

# In the state folder: deleted volumes' folders on their way out (World.delete_volume).
TRASH_DIR = "trash"

FAULT_KINDS = ("429", "500", "502", "503", "slow", "timeout", "capacity", "error_after_create", "drop")


@dataclass
class Fault:
    """One injected fault.

    target is "<api>:<operation>" where api is lambda, runpod or hf and operation is the Lambda path
    after /api/v1 with ids replaced by {id} (e.g. "instance-operations/launch", "instances/{id}"),
    the RunPod GraphQL root field (e.g. "podFindAndDeployOnDemand") or REST v1 path ("networkvolumes",
    "networkvolumes/{id}"; e.g. "lambda:filesystems" and "runpod:networkvolumes" for volume creation), or the Hub route ("model_info",
    "resolve"); "*" matches any operation. kind is one of FAULT_KINDS:
    429/500/502/503 answer that status; slow sleeps `delay` and then answers normally; timeout
    sleeps `delay` after doing the work (so a client that gave up cannot know whether it happened);
    capacity answers the cloud's capacity error; error_after_create does the work and answers 500
    (RunPod: with an error message no client has a rule for);
    drop does the work and closes the connection without an answer.
    """

    target: str
    kind: str
    times: int = 1
    delay: float = 5.0

    def matches(self, api: str, op: str) -> bool:
        want_api, _, want_op = self.target.partition(":")
        return want_api == api and want_op in ("*", op)


@dataclass
class SimInstance:
    id: str
    cloud: str  # "lambda" | "runpod"
    name: str
    type_name: str  # Lambda instance type, or RunPod GPU type id
    region: str
    gpu_count: int
    price_per_hour: float
    status: str  # Lambda: booting/active/unhealthy/terminating/terminated/preempted; RunPod: desiredStatus
    created_at: float
    ssh_key_names: list[str] = field(default_factory=list)
    authorized_keys: list[str] = field(default_factory=list)
    user_data: str | None = None
    image: str = ""
    env: dict[str, str] = field(default_factory=dict)
    ports: str = ""
    spot: bool = False
    disk_gb: int = 0
    hostname: str | None = None
    tags: list[dict] = field(default_factory=list)
    address: str | None = None  # set once the host is up
    ssh_port: int = 22  # the port the controller dials (RunPod: the mapped public port)
    ssh_user: str = ""  # who the host lets in (differs from the cloud's user only on loopback hosts)
    pod_key: str | None = None  # RunPod pod-scoped API key
    booted_at: float | None = None
    last_status_change: float = 0.0
    holds_slot: bool = True  # counted against its type's capacity until released
    driver: catalog.Driver = catalog.LAMBDA_DRIVER  # the host's NVIDIA driver (RunPod: where the pod landed)
    volume_ids: list[str] = field(default_factory=list)  # attached at launch (Lambda filesystems, a RunPod volume)
    volume_mount_path: str = "/runpod-volume"  # RunPod: where the pod sees its volume (the deploy's volumeMountPath)

    @property
    def host_up(self) -> bool:
        return self.address is not None


@dataclass
class SimVolume:
    """A Lambda filesystem or a RunPod network volume: a folder of the simulator's (World.volume_dir)
    that outlives the hosts it is mounted in."""

    id: str
    cloud: str
    name: str
    region: str  # Lambda region; RunPod data center
    size_gb: int | None  # RunPod only
    created_at: float


@dataclass
class SshKey:
    id: str
    name: str
    public_key: str


class RateLimiter:
    """Token buckets per (key, bucket). rate is tokens per second, burst the bucket size."""

    def __init__(self):
        self._buckets: dict[tuple, list[float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: tuple, rate: float, burst: int) -> bool:
        if rate <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, [float(burst), now])
            tokens = min(float(burst), tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[key] = [tokens, now]
                return False
            self._buckets[key] = [tokens - 1.0, now]
            return True


@dataclass
class SimConfig:
    """Knobs. Defaults are what a person rehearsing would want; tests shorten the delays."""

    boot_delay: float = 3.0  # launch → host starting
    terminate_delay: float = 1.0  # Lambda: terminating → terminated
    gone_after: float = 10.0  # Lambda: terminated → 404
    lambda_rate: float = 1.0  # requests per second (documented: 1/s)
    lambda_burst: int = 10
    lambda_launch_rate: float = 1 / 12  # documented: 1 launch per 12 s, 5 per minute
    lambda_launch_burst: int = 5
    isolate_hosts: bool | None = None  # None: when root


def new_keys() -> dict[str, list[str]]:
    return {
        "lambda": ["sim-lambda-" + secrets.token_hex(12)],
        "runpod": ["sim-runpod-" + secrets.token_hex(12)],
        "hf": ["hf_sim" + secrets.token_hex(12)],
    }


def _hex_id() -> str:
    return secrets.token_hex(16)


def _pod_id(k: int = 14) -> str:
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=k))


class World:
    def __init__(self, state_dir: Path, config: SimConfig | None = None, keys: dict[str, list[str]] | None = None):
        self.config = config or SimConfig()
        self.state_dir = state_dir
        self.lock = threading.RLock()
        self.hosts = Hosts(state_dir, isolate=self.config.isolate_hosts)
        # Accepted credentials per API; the first of each is the one `invoke sim` prints.
        self.keys: dict[str, list[str]] = keys or new_keys()
        self.inactive_keys: set[str] = set()  # Lambda: valid key of an inactive account → 403
        self.instances: dict[str, SimInstance] = {}
        self.ssh_keys: dict[str, SshKey] = {}
        self.runpod_pub_keys: list[str] = []  # account-level keys (myself.pubKey)
        self.capacity: dict[tuple[str, str, str], int] = {}  # (cloud, type, region) → slots in all
        self.in_use: dict[tuple[str, str, str], int] = {}  # (cloud, type, region) → slots held by instances
        self.faults: list[Fault] = []
        self.limiter = RateLimiter()
        self.events: list[dict] = []  # what happened, for tests and `sim --list`
        self._closed = False
        self._ports = iter(range(20000 + random.randrange(0, 20000), 65000))
        self.host_api_base = ""  # set by the Simulator: the API as pods reach it
        # Volumes outlive hosts and the simulator itself: volumes.json lists them, volumes/<id>/ holds their files.
        self.volumes_root = state_dir / "volumes"
        self.volumes_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.volumes_root.chmod(0o700)
        self.volumes: dict[str, SimVolume] = self._load_volumes()
        # Deleted volumes' folders, renamed here at once and removed after the answer (delete_volume).
        # Unlike volumes, the trash outlives neither the simulator nor a restart.
        self.trash_root = state_dir / TRASH_DIR
        self.trash_root.mkdir(mode=0o700, exist_ok=True)
        self.trash_root.chmod(0o700)
        self._removals: list[threading.Thread] = []
        if any(self.trash_root.iterdir()):  # left by a simulator that was killed while removing
            self._remove_later(*self.trash_root.iterdir())

    @property
    def lambda_keys(self) -> list[str]:
        return self.keys["lambda"]

    @property
    def runpod_keys(self) -> list[str]:
        return self.keys["runpod"]

    @property
    def hf_tokens(self) -> list[str]:
        return self.keys["hf"]

    # --- knobs -----------------------------------------------------------------------------

    def set_capacity(self, cloud: str, type_name: str, region: str | None, slots: int) -> None:
        regions = [region] if region else self.regions(cloud)
        with self.lock:
            for r in regions:
                self.capacity[(cloud, type_name, r)] = slots

    def inject(self, fault: Fault) -> None:
        if fault.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {fault.kind!r}: one of {', '.join(FAULT_KINDS)}")
        with self.lock:
            self.faults.append(fault)

    def take_fault(self, api: str, op: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.matches(api, op) and f.times > 0:
                    f.times -= 1
                    if f.times == 0:
                        self.faults.remove(f)
                    self.record("fault", api=api, op=op, kind=f.kind)
                    return f
        return None

    def record(self, what: str, **info) -> None:
        with self.lock:
            self.events.append({"t": time.time(), "event": what, **info})

    # --- capacity --------------------------------------------------------------------------

    @staticmethod
    def regions(cloud: str) -> list[str]:
        return list(catalog.LAMBDA_REGIONS) if cloud == "lambda" else list(catalog.RUNPOD_DATA_CENTERS)

    def free_slots(self, cloud: str, type_name: str, region: str) -> int:
        key = (cloud, type_name, region)
        with self.lock:
            return self.capacity.get(key, catalog.DEFAULT_CAPACITY) - self.in_use.get(key, 0)

    def take_slot(self, cloud: str, type_name: str, region: str) -> bool:
        with self.lock:
            if self.free_slots(cloud, type_name, region) <= 0:
                return False
            key = (cloud, type_name, region)
            self.in_use[key] = self.in_use.get(key, 0) + 1
            return True

    def _give_slot(self, inst: SimInstance) -> None:
        key = (inst.cloud, inst.type_name, inst.region)
        with self.lock:
            if inst.holds_slot:
                inst.holds_slot = False
                self.in_use[key] -= 1

    # --- instances -------------------------------------------------------------------------

    def new_instance(self, cloud: str, **fields) -> SimInstance:
        inst_id = _hex_id() if cloud == "lambda" else _pod_id()
        now = time.time()
        inst = SimInstance(id=inst_id, cloud=cloud, created_at=now, last_status_change=now, **fields)
        if cloud == "runpod":
            inst.ssh_port = next(self._ports)
            inst.pod_key = "sim-pod-" + secrets.token_hex(16)
        with self.lock:
            self.instances[inst_id] = inst
        self.record("launch", cloud=cloud, id=inst_id, name=inst.name, type=inst.type_name, region=inst.region)
        self._spawn(self._boot, inst)
        return inst

    def _spawn(self, fn, *args) -> None:
        """Timelines run on daemon threads; close() stops new boots and tears the hosts down."""
        threading.Thread(target=fn, args=args, daemon=True).start()

    def _gpus_of(self, inst: SimInstance) -> list[tuple[str, int]]:
        if inst.cloud == "lambda":
            t = catalog.lambda_type(inst.type_name)
            return [(f"NVIDIA {t.gpu} {t.vram_gb}GB", t.memory_mib)] * t.gpus
        g = catalog.runpod_gpu(inst.type_name)
        return [(g.id, g.memory_mib)] * inst.gpu_count

    def _boot(self, inst: SimInstance) -> None:
        time.sleep(self.config.boot_delay)
        with self.lock:
            if inst.status not in ("booting", "RUNNING") or self._closed:
                return
        if inst.cloud == "lambda":
            spec = HostSpec(
                inst.id,
                "ubuntu",
                inst.authorized_keys,
                self._gpus_of(inst),
                files=_cloud_init_files(inst.user_data),
                hostname=inst.hostname,
                driver=(inst.driver.version, inst.driver.cuda),
                mounts=self._mounts(inst),
            )
        else:
            env = {
                **inst.env,
                "RUNPOD_POD_ID": inst.id,
                "RUNPOD_API_KEY": inst.pod_key,
                "RUNPOD_GPU_COUNT": str(inst.gpu_count),
                "RUNPOD_PUBLIC_IP": "",
                "RUNPOD_TCP_PORT_22": str(inst.ssh_port),
                # Not set by RunPod itself: where this simulator's API answers from inside a pod.
                "RUNPOD_API_BASE_URL": self.host_api_base,
            }
            keys = [k for k in env.get("PUBLIC_KEY", "").split("\n") if k.strip()]
            spec = HostSpec(
                inst.id,
                "root",
                keys,
                self._gpus_of(inst),
                env=env,
                extra_ports=[inst.ssh_port],
                driver=(inst.driver.version, inst.driver.cuda),
                mounts=self._mounts(inst),
            )
        try:
            host = self.hosts.start(spec)
        except HostError as e:
            log.error("instance %s: host failed to start: %s", inst.id, e)
            self._set_status(inst, "unhealthy" if inst.cloud == "lambda" else "EXITED")
            return
        with self.lock:
            if inst.status not in ("booting", "RUNNING"):  # terminated while booting
                stop = True
            else:
                stop = False
                inst.address = host.address
                if inst.cloud == "runpod":
                    inst.env["RUNPOD_PUBLIC_IP"] = host.address  # sshd listens on the mapped port too
                else:
                    inst.ssh_port = host.port
                inst.ssh_user = host.user
                inst.booted_at = time.time()
        if stop:
            self.hosts.stop(inst.id)
            return
        if inst.cloud == "lambda":
            self._set_status(inst, "active")
        self.record("ready", id=inst.id, address=host.address)

    def _set_status(self, inst: SimInstance, status: str) -> None:
        with self.lock:
            inst.status = status
            inst.last_status_change = time.time()

    def terminate(self, inst: SimInstance, by: str = "account-key") -> None:
        """Answer at once; the host goes down a moment later, as a real machine does (a pod that
        terminates itself gets its answer). Lambda shows `terminating` meanwhile; RunPod drops the
        pod from its listings at once."""
        self.record("terminate", cloud=inst.cloud, id=inst.id, name=inst.name, by=by)
        if inst.cloud == "lambda":
            self._set_status(inst, "terminating")
        else:
            with self.lock:
                self.instances.pop(inst.id, None)
                inst.status = "TERMINATED"
        self._spawn(self._finish_terminate, inst)

    def _release(self, inst: SimInstance) -> None:
        self._host_down(inst)
        self._give_slot(inst)

    def _finish_terminate(self, inst: SimInstance) -> None:
        time.sleep(self.config.terminate_delay)
        self._release(inst)
        if inst.cloud == "runpod":
            return
        self._set_status(inst, "terminated")
        self._forget_later(inst)

    def _forget_later(self, inst: SimInstance) -> None:
        """Terminated Lambda instances answer for a while, then 404."""
        time.sleep(self.config.gone_after)
        with self.lock:
            self.instances.pop(inst.id, None)

    def stop_pod(self, inst: SimInstance) -> None:
        self._host_down(inst)
        self._set_status(inst, "EXITED")

    def _host_down(self, inst: SimInstance) -> None:
        self.hosts.stop(inst.id)
        with self.lock:
            inst.address = None

    def restart(self, inst: SimInstance) -> None:
        """Reboot (Lambda restart, RunPod resume): the host goes down and boots again. The
        simulator does not keep the host's files across a restart."""
        self._host_down(inst)
        self._set_status(inst, "booting" if inst.cloud == "lambda" else "RUNNING")
        self._spawn(self._boot, inst)

    # --- volumes ---------------------------------------------------------------------------

    def volume_dir(self, vol: SimVolume) -> Path:
        return self.volumes_root / vol.id

    def _load_volumes(self) -> dict[str, SimVolume]:
        path = self.state_dir / "volumes.json"
        if not path.exists():
            return {}
        vols = [SimVolume(**v) for v in json.loads(path.read_text())]
        return {v.id: v for v in vols if (self.volumes_root / v.id).is_dir()}

    def _save_volumes(self) -> None:
        path = self.state_dir / "volumes.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump([vars(v) for v in self.volumes.values()], f)
        tmp.replace(path)

    def new_volume(self, cloud: str, name: str, region: str, size_gb: int | None = None) -> SimVolume:
        """The volume and its empty folder, owned as the cloud's hosts expect (hosts.Hosts.volume_owner)."""
        vol = SimVolume(_hex_id() if cloud == "lambda" else _pod_id(10), cloud, name, region, size_gb, time.time())
        folder = self.volume_dir(vol)
        folder.mkdir(mode=0o755)
        uid, gid = self.hosts.volume_owner("ubuntu" if cloud == "lambda" else "root")
        os.chown(folder, uid, gid)
        with self.lock:
            self.volumes[vol.id] = vol
            self._save_volumes()
        self.record("volume_created", cloud=cloud, id=vol.id, name=name, region=region)
        return vol

    def find_volume(self, cloud: str, vol_id: str) -> SimVolume | None:
        with self.lock:
            vol = self.volumes.get(vol_id)
            return vol if vol is not None and vol.cloud == cloud else None

    def volume_listing(self, cloud: str) -> list[SimVolume]:
        with self.lock:
            return [v for v in self.volumes.values() if v.cloud == cloud]

    def volume_users(self, vol: SimVolume) -> list[SimInstance]:
        """The instances that have the volume attached: every one not terminated (a stopped pod keeps its volume)."""
        with self.lock:
            return [
                i
                for i in self.instances.values()
                if vol.id in i.volume_ids and i.status not in ("terminated", "preempted", "TERMINATED")
            ]

    def volume_bytes(self, vol: SimVolume) -> int:
        """What the folder holds: the sizes of its files, in bytes, each file once however many hard
        links it has (uv links its cache into venvs), as a filesystem's usage counts its inodes.
        Symlinks count their own size (lstat), not their target's; directories count nothing."""
        total = 0
        seen: set[tuple[int, int]] = set()
        for root, _dirs, files in os.walk(self.volume_dir(vol)):
            for f in files:
                try:
                    st = os.lstat(os.path.join(root, f))
                except OSError:
                    continue
                if st.st_nlink > 1:
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                total += st.st_size
        return total

    def delete_volume(self, vol: SimVolume) -> None:
        """Forget the volume at once and free its storage after (callers check volume_users first),
        as a cloud answers a delete: its folder leaves volumes/ by a rename into the trash (the same
        filesystem) and is removed on a thread, so a big volume's delete answers before a client's
        timeout. Both clouds' deletes come here."""
        with self.lock:
            self.volumes.pop(vol.id, None)
            self._save_volumes()
            trash = self.trash_root / f"{vol.id}-{secrets.token_hex(4)}"
            try:
                self.trash_root.mkdir(
                    mode=0o700, exist_ok=True
                )  # removed by hand since the start: not a reason to keep the folder
                self.volume_dir(vol).rename(trash)
            except FileNotFoundError:
                trash = None
            except OSError as e:  # not renamed: removed where it is, still after the answer
                log.warning("volume %s: could not move its folder to the trash (%s); removing it in place", vol.id, e)
                trash = self.volume_dir(vol)
        self.record("volume_deleted", cloud=vol.cloud, id=vol.id, name=vol.name)
        if trash is not None:
            self._remove_later(trash)

    def _remove_later(self, *paths: Path) -> None:
        t = threading.Thread(target=_remove_trees, args=paths, daemon=True, name="sim-trash")
        with self.lock:  # started before empty_trash can see it (it joins what it sees)
            self._removals = [r for r in self._removals if r.is_alive()] + [t]
            t.start()

    def empty_trash(self) -> None:
        """Finish removing deleted volumes' folders: what the threads are removing and anything left."""
        with self.lock:
            removals, self._removals = self._removals, []
        for t in removals:
            t.join()
        remove_trash(self.state_dir)

    def _mounts(self, inst: SimInstance) -> list[tuple[str, str]]:
        """(folder on this machine, path in the host) per attached volume: Lambda mounts a filesystem at
        /lambda/nfs/<name>, RunPod at the pod's volumeMountPath."""
        out = []
        for vid in inst.volume_ids:
            vol = self.volumes.get(vid)
            if vol is not None:
                path = f"/lambda/nfs/{vol.name}" if inst.cloud == "lambda" else inst.volume_mount_path
                out.append((str(self.volume_dir(vol)), path))
        return out

    # --- instance faults -------------------------------------------------------------------

    def kill_instance(self, inst_id: str) -> None:
        """The instance dies: its host vanishes; Lambda reports it terminated, RunPod EXITED."""
        inst = self.instances[inst_id]
        self.record("died", id=inst_id)
        self._host_down(inst)
        if inst.cloud == "lambda":
            self._give_slot(inst)
            self._set_status(inst, "terminated")
            self._spawn(self._forget_later, inst)
        else:
            self._set_status(inst, "EXITED")

    def make_unhealthy(self, inst_id: str) -> None:
        """The instance stays billed but stops answering SSH (Lambda: status unhealthy)."""
        inst = self.instances[inst_id]
        self.record("unhealthy", id=inst_id)
        self._host_down(inst)
        if inst.cloud == "lambda":
            self._set_status(inst, "unhealthy")

    # --- views -----------------------------------------------------------------------------

    def find(self, cloud: str, inst_id: str) -> SimInstance | None:
        with self.lock:
            inst = self.instances.get(inst_id)
            return inst if inst is not None and inst.cloud == cloud else None

    def listing(self, cloud: str) -> list[SimInstance]:
        with self.lock:
            return [i for i in self.instances.values() if i.cloud == cloud]

    def snapshot(self) -> dict:
        """Everything a test or `invoke sim --list` wants to see."""
        with self.lock:
            return {
                "instances": [
                    {
                        "id": i.id,
                        "cloud": i.cloud,
                        "name": i.name,
                        "type": i.type_name,
                        "region": i.region,
                        "status": i.status,
                        "address": i.address,
                        "ssh_port": i.ssh_port,
                        "driver": i.driver.version,
                        "host_dir_exists": (self.hosts.dir / i.id).exists(),
                    }
                    for i in self.instances.values()
                ],
                "ssh_keys": [{"id": k.id, "name": k.name} for k in self.ssh_keys.values()],
                "volumes": [
                    {
                        "id": v.id,
                        "cloud": v.cloud,
                        "name": v.name,
                        "region": v.region,
                        "size_gb": v.size_gb,
                        "dir": str(self.volume_dir(v)),
                        "used_by": [i.id for i in self.volume_users(v)],
                    }
                    for v in self.volumes.values()
                ],
                "faults": [vars(f) for f in self.faults],
                "hosts_isolated": self.hosts.isolated,
                # Who ended what: "account-key", or "pod-key" for a pod that ended itself.
                "terminations": [
                    {k: e[k] for k in ("t", "cloud", "id", "name", "by")} for e in self.events if e["event"] == "terminate"
                ],
            }

    def close(self) -> None:
        with self.lock:
            self._closed = True
        self.hosts.close()


def _remove_trees(*paths: Path) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def remove_trash(state_dir: Path) -> int:
    """Remove what is left of deleted volumes in state_dir's trash (Simulator.close through
    World.empty_trash, `invoke sim --cleanup`); its volumes stay. How many were there."""
    trash = state_dir / TRASH_DIR
    left = list(trash.iterdir()) if trash.is_dir() else []
    _remove_trees(*left)
    return len(left)


def _cloud_init_files(user_data: str | None) -> list[dict]:
    """What a #cloud-config document places on the host: its `write_files` entries, and the host
    keys of `ssh_keys` (as cloud-init's ssh module installs them before sshd starts)."""
    if not user_data or not user_data.lstrip().startswith("#cloud-config"):
        return []
    import base64

    import yaml

    doc = yaml.safe_load(user_data) or {}
    files = []
    for f in doc.get("write_files") or []:
        content = f.get("content", "")
        if f.get("encoding") in ("b64", "base64"):
            content = base64.b64decode(content).decode("latin-1")
        files.append({"path": f["path"], "content": content, "permissions": str(f.get("permissions", "0644"))})
    keys = doc.get("ssh_keys") or {}
    for kind in ("ed25519", "ecdsa", "rsa"):
        for part, suffix, mode in (("private", "", "0600"), ("public", ".pub", "0644")):
            if keys.get(f"{kind}_{part}"):
                path = f"/etc/ssh/ssh_host_{kind}_key{suffix}"
                files.append({"path": path, "content": keys[f"{kind}_{part}"], "permissions": mode})
    return files
