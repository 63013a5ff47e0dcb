"""What every cloud client offers, the data that crosses module lines, typed errors, and the
policy shared by all clouds: retries with backoff and jitter, launches that are never retried
blindly, and waiting for SSH.
"""

from __future__ import annotations

import logging
import random
import re
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from gpu_session.errors import GpuSessionError, our_command

from . import gpus

log = logging.getLogger("gpu_session.clouds")

T = TypeVar("T")

# Names we give instances and keys: safe for every cloud's API and for the RunPod SDK, which
# inlines strings into GraphQL documents without escaping them.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# --- errors -----------------------------------------------------------------------------------


class CloudError(GpuSessionError):
    """A cloud API call failed. `retryable` says whether the same call may succeed later."""

    retryable = False

    def __init__(self, message: str, *, retryable: bool | None = None):
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


def unreachable(what: str, e: Exception) -> CloudError:
    """A request that got no answer (requests' ConnectionError or Timeout) as a CloudError naming
    `what`: retryable (a dropped connection, a busy API), except a connection refused at this
    machine's loopback, where only the simulator listens: nothing answers there until one is
    started, so waiting through the retries would only hide that."""
    import ipaddress
    from urllib.parse import urlsplit

    url = urlsplit(getattr(getattr(e, "request", None), "url", None) or "")
    try:
        local = url.hostname == "localhost" or ipaddress.ip_address(url.hostname or "").is_loopback
    except ValueError:
        local = False
    if local and "refused" in str(e).lower():
        return NoSimulator(
            f"{what}: nothing listens at {url.netloc}: no simulator runs there now ({our_command('sim')} starts one)"
        )
    return CloudError(f"{what}: {type(e).__name__}", retryable=True)


class NoSimulator(CloudError):
    """The API address is this machine's loopback and nothing listens there: a simulator that is not running."""


class AuthError(CloudError):
    """The API key is missing, wrong, or its account cannot act."""


class InvalidRequest(CloudError, ValueError):
    """The request would be (or was) rejected as malformed: nothing was changed."""


class NotFound(CloudError):
    """The instance or key does not exist (or no longer does)."""


class RateLimited(CloudError):
    retryable = True


# An offer's region when the cloud places the machine itself (RunPod picks the data center).
ANY_REGION = "any"


class CapacityError(CloudError):
    """No capacity for the request; `available` names what does have capacity, when known."""

    def __init__(self, message: str, available: list[str] | None = None):
        self.available = available or []
        if self.available:
            message = f"{message} Available now: {', '.join(self.available)}."
        super().__init__(message)


class NotReady(CloudError):
    """The instance did not become reachable over SSH before the deadline, or stopped being alive."""


class VolumeInUse(CloudError):
    """A volume's deletion was refused: it is attached to an instance (terminate that first)."""


# --- data -------------------------------------------------------------------------------------


class Status:
    PENDING = "pending"  # launched, not reachable yet
    RUNNING = "running"  # SSH endpoint known
    UNHEALTHY = "unhealthy"  # billed, not serving
    STOPPED = "stopped"  # RunPod EXITED: storage still billed, must still be terminated
    TERMINATING = "terminating"
    TERMINATED = "terminated"

    ALIVE = (PENDING, RUNNING, UNHEALTHY, STOPPED)  # costs money: must be terminated


@dataclass(frozen=True)
class Offer:
    cloud: str
    gpu_name: str  # as the cloud names it: "H100", "RTX 4090"
    instance_type: str  # the id to launch: Lambda instance type, RunPod GPU type id
    gpu_count: int
    vram_gb: int  # per GPU
    price_per_hour: float  # USD, the whole instance
    regions: tuple[str, ...]  # with capacity now; empty when none; ANY_REGION where the cloud places it
    spot: bool = False

    @property
    def total_vram_gb(self) -> int:
        return self.vram_gb * self.gpu_count

    @property
    def memory_mib(self) -> int:
        """What nvidia-smi reports for all its GPUs together (less than the GB sold; clouds.gpus)."""
        return gpus.reported_mib(self.gpu_name, self.vram_gb) * self.gpu_count

    @property
    def arch(self) -> str:
        """The machine's CPU architecture: x86_64, or aarch64 for the Grace machines (GH200)."""
        return gpus.arch(self.gpu_name)

    def launch_regions(self) -> list[str | None]:
        """Where a launch of this offer may ask for: a region's name, or None where the cloud
        places the machine itself (a RunPod offer: it picks the data center)."""
        return [None if r == ANY_REGION else r for r in self.regions]


@dataclass(frozen=True)
class SshEndpoint:
    host: str
    port: int
    user: str


@dataclass
class Instance:
    id: str
    name: str
    status: str  # a Status value
    raw_status: str  # what the cloud said
    instance_type: str
    gpu_name: str
    gpu_count: int
    region: str
    price_per_hour: float
    endpoint: SshEndpoint | None = None

    @property
    def alive(self) -> bool:
        return self.status in Status.ALIVE


@dataclass(frozen=True)
class Volume:
    """A cache volume that outlives instances: a Lambda persistent filesystem or a RunPod network volume."""

    id: str
    name: str
    cloud: str
    region: str  # Lambda region name; RunPod data center id (e.g. "EU-RO-1")
    size_gb: int | None  # RunPod: its size; Lambda: None (a Lambda filesystem grows with use)
    bytes_used: int | None  # as the cloud reports it; None when it does not
    in_use: bool  # attached to a live instance
    mount_point: str  # where a host sees it: Lambda's mount_point field; RunPod: runpod.VOLUME_MOUNT_PATH


@dataclass
class LaunchSpec:
    name: str  # deterministic: the launch is looked up by it before any retry
    instance_type: str
    region: str | None = None  # None: any region with capacity
    gpu_count: int = 1
    ssh_public_key: str = ""  # RunPod: goes in as PUBLIC_KEY
    ssh_key_name: str | None = None  # Lambda: a registered key's name
    image: str | None = None
    disk_gb: int | None = None
    user_data: str | None = None  # Lambda: cloud-init
    env: dict[str, str] = field(default_factory=dict)  # RunPod: container environment (not for secrets)
    spot: bool = False
    bid_per_gpu: float | None = None  # RunPod spot
    volume: Volume | None = None  # attached at launch (the instance lands in the volume's region)


@dataclass(frozen=True)
class SshKeyInfo:
    id: str
    name: str
    public_key: str


# --- retries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: base·2^n capped at cap, each sleep drawn from [d/2, d] and
    never shorter than floor (a cloud's documented request interval)."""

    attempts: int = 6
    base: float = 1.0
    cap: float = 30.0
    floor: float = 0.0

    def delays(self) -> Iterator[float]:
        for n in range(self.attempts - 1):
            d = min(self.cap, self.base * 2**n)
            yield max(self.floor, d / 2 + random.uniform(0, d / 2))


def with_retries(call: Callable[[], T], policy: RetryPolicy, what: str) -> T:
    """Run `call`, retrying only errors marked retryable (429, 5xx, timeouts, dropped connections)."""
    delays = policy.delays()
    while True:
        try:
            return call()
        except CloudError as e:
            if not e.retryable:
                raise
            delay = next(delays, None)
            if delay is None:
                raise
            log.info("%s: %s; retrying in %.1fs", what, e, delay)
            time.sleep(delay)


def validate_name(name: str, what: str = "name") -> None:
    if not NAME_RE.match(name or ""):
        raise InvalidRequest(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )


def ssh_banner(host: str, port: int, timeout: float = 3.0) -> bool:
    """True when an SSH server answers on host:port (it sends its banner first)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


# --- the interface ----------------------------------------------------------------------------


class Cloud(ABC):
    """One cloud. Subclasses implement the wire calls (each public call retries what is safe to
    retry); the policy above them lives here. What differs between clouds is said by the class
    attributes below, which the program, the session and the watch read instead of a cloud's name."""

    name: str
    ssh_user: str
    # How the session's SSH key reaches the host: registered with the account before launch
    # (Lambda's /ssh-keys, a LambdaSshKey resource) or passed in each launch (RunPod's PUBLIC_KEY).
    registers_ssh_keys: bool
    # Where the host's SSH key comes from: ours, handed to the host in its cloud-init user data and
    # pinned before it boots (Lambda); or the host's own, pinned the first time it is seen (RunPod).
    takes_host_key: bool
    # Whether the host can end itself (stop its billing) at the lease's end: a RunPod pod can remove
    # itself; a Lambda instance can only wipe itself, so this machine's watch terminates it.
    host_ends_itself: bool
    # Whether the host is a container of an image we name (a RunPod pod) or the cloud's own OS (Lambda).
    runs_container_image: bool
    launch_interval: float = 0.0  # the cloud's documented minimum between launches: a rate-limited launch waits this long
    # What a cache volume costs, USD per GB-month (each cloud's class cites its price list).
    volume_price_per_gb_month: float
    # Whether a volume has a size, fixed at creation and billed whether used or not (a RunPod network
    # volume), or grows with use and bills what it holds (a Lambda filesystem).
    sizes_volumes: bool

    def __init__(self, retry: RetryPolicy | None = None, poll_interval: float = 2.0):
        self.retry = retry or RetryPolicy()
        self.poll_interval = poll_interval

    @abstractmethod
    def offers(self) -> list[Offer]: ...

    @abstractmethod
    def get(self, instance_id: str) -> Instance:
        """The instance; NotFound when the cloud no longer knows it."""

    @abstractmethod
    def list(self, name_prefix: str = "") -> list[Instance]: ...

    @abstractmethod
    def _terminate_once(self, instance_id: str) -> None:
        """One termination request, no retries: None, or an error (NotFound when it is gone)."""

    @abstractmethod
    def _launch_once(self, spec: LaunchSpec) -> str:
        """One launch request, no retries: the id, or an error."""

    def _check_launch(self, spec: LaunchSpec) -> LaunchSpec:
        """Refuse what the API would reject, and resolve defaults, before any call. May call offers()."""
        validate_name(spec.name)
        return spec

    # --- SSH keys (clouds without account keys keep the defaults) ---

    def list_ssh_keys(self) -> list[SshKeyInfo]:
        return []

    def register_ssh_key(self, name: str, public_key: str) -> SshKeyInfo:
        raise InvalidRequest(f"{self.name} takes the SSH key per launch; nothing to register")

    def delete_ssh_key(self, key_id: str) -> None:
        raise NotFound(f"{self.name} has no account SSH keys")

    # --- volumes (a cache that outlives instances, attached at launch: LaunchSpec.volume) ---

    @abstractmethod
    def volumes(self) -> list[Volume]:
        """Every volume of the account, with whether an instance uses it."""

    @abstractmethod
    def _check_volume(self, name: str, region: str, size_gb: int | None) -> None:
        """Refuse a name, region or size the API would reject (InvalidRequest), before any call."""

    @abstractmethod
    def _create_volume_once(self, name: str, region: str, size_gb: int | None) -> Volume:
        """One creation request, no retries: the volume, or an error."""

    @abstractmethod
    def _delete_volume_once(self, volume_id: str) -> None:
        """One deletion request, no retries: None, or an error (NotFound, VolumeInUse, ...)."""

    def _volume_named(self, name: str, region: str) -> Volume | None:
        """The volume of this name in this region, if any; InvalidRequest when the name is taken elsewhere."""
        named = [v for v in self.volumes() if v.name == name]
        here = next((v for v in named if v.region == region), None)
        if here is None and named:
            raise InvalidRequest(
                f"a {self.name} volume named {name!r} already exists in {named[0].region}, not {region}: "
                "choose another name, or use that region"
            )
        return here

    def create_volume(self, name: str, region: str, size_gb: int | None) -> Volume:
        """Create idempotently: a volume of this name in this region is adopted (whatever its size);
        the same name in another region is an InvalidRequest. After a failure that is not a refusal
        (5xx, timeout, dropped connection, an error we cannot read) the name is looked up before
        any retry, as launch() does, so an ambiguous failure never makes a second volume."""
        self._check_volume(name, region, size_gb)
        existing = self._volume_named(name, region)
        if existing is not None:
            log.info("%s: adopting volume %s (%s), already created in %s", self.name, existing.id, name, region)
            return existing
        delays = self.retry.delays()
        while True:
            try:
                return self._create_volume_once(name, region, size_gb)
            except (AuthError, InvalidRequest, VolumeInUse):
                raise  # refused before anything was made
            except CloudError as e:
                delay = next(delays, None) if e.retryable else None
                log.info("%s: creating volume %s failed (%s); checking whether it happened", self.name, name, e)
                time.sleep(delay if delay is not None else 0)
                found = self._volume_named(name, region)
                if found is not None:
                    log.info("%s: the volume was created after all: %s", self.name, found.id)
                    return found
                if delay is None:
                    raise

    def delete_volume(self, volume_id: str) -> None:
        """Delete; NotFound when it is already gone, VolumeInUse while an instance has it attached.
        After a failure that may have come once the deletion took effect (5xx, dropped connection),
        the volume is looked for before any retry, as terminate() does."""
        delays = self.retry.delays()
        while True:
            try:
                return self._delete_volume_once(volume_id)
            except (NotFound, VolumeInUse, AuthError, InvalidRequest):
                raise
            except CloudError as e:
                if not any(v.id == volume_id for v in self.volumes()):
                    log.info("%s: volume %s is gone after all (%s)", self.name, volume_id, e)
                    return None
                delay = next(delays, None) if e.retryable else None
                if delay is None:
                    raise
                log.info("%s: deleting volume %s failed (%s); retrying in %.1fs", self.name, volume_id, e, delay)
                time.sleep(delay)

    # --- policy ---

    def find_by_name(self, name: str) -> Instance | None:
        """The live instance with exactly this name, if any."""
        return next((i for i in self.list(name) if i.name == name and i.alive), None)

    def launch(self, spec: LaunchSpec) -> str:
        """Launch idempotently: adopt a live instance of the same name; after any failure that is not
        a refusal before creation (timeout, dropped connection, 5xx, 429, an error we cannot read)
        look the name up before deciding, and retry only what is retryable.

        A found instance is adopted rather than ended: the name is the launch's own (deterministic,
        one per stack and machine), so what bears it was made from this very spec, and the caller
        (the provider) records it in the stack, where `down` ends it. Ending it would only start the
        same launch again."""
        spec = self._check_launch(spec)
        existing = self.find_by_name(spec.name)
        if existing is not None:
            log.info("%s: adopting %s, already launched as %s", self.name, existing.id, spec.name)
            return existing.id
        delays = self.retry.delays()
        while True:
            try:
                return self._launch_once(spec)
            except (AuthError, InvalidRequest, CapacityError):
                raise  # refused before anything was made
            except CloudError as e:
                delay = next(delays, None) if e.retryable else None
                if delay is not None and isinstance(e, RateLimited):
                    delay = max(delay, self.launch_interval)
                log.info("%s: launch of %s failed (%s); checking whether it happened", self.name, spec.name, e)
                time.sleep(delay if delay is not None else 0)
                found = self.find_by_name(spec.name)
                if found is not None:
                    log.info("%s: the launch went through after all: %s", self.name, found.id)
                    return found.id
                if delay is None:
                    raise

    def ending(self, instance_id: str) -> bool:
        """Whether the instance is terminating or terminated; NotFound when the cloud no longer knows it."""
        return self.get(instance_id).status in (Status.TERMINATING, Status.TERMINATED)

    def terminate(self, instance_id: str) -> None:
        """Ask for termination; NotFound when it is already gone. An instance already terminating
        or terminated counts as asked. A failed request is followed by a look at the instance before
        any retry: Lambda answers a terminate of an instance already on its way out with an error
        (global/unknown, a 500), and a 5xx or a dropped connection may come after the request took
        effect, so a retry would only meet that error again."""
        delays = self.retry.delays()
        while True:
            try:
                return self._terminate_once(instance_id)
            except NotFound:
                raise
            except CloudError as e:
                if self.ending(instance_id):  # NotFound from here: gone, as the caller wants
                    log.info("%s: %s is already on its way out (%s)", self.name, instance_id, e)
                    return None
                delay = next(delays, None) if e.retryable else None
                if delay is None:
                    raise
                log.info("%s: terminate of %s failed (%s); retrying in %.1fs", self.name, instance_id, e, delay)
                time.sleep(delay)

    def poll_delays(self) -> Iterator[float]:
        """Seconds between a start's polls: a quarter of poll_interval, doubling up to it, never under
        the retry policy's floor (a cloud's documented request interval). The first polls come sooner
        because a host may be up in a second or two (a RunPod pod from a cached image, the simulator);
        a slower one costs two requests more than a steady poll_interval."""
        delay = self.poll_interval / 4
        while True:
            yield max(self.retry.floor, delay)
            delay = min(delay * 2, self.poll_interval)

    def wait_ready(self, instance_id: str, deadline: float) -> SshEndpoint:
        """Until the instance runs and its sshd answers; deadline is a time.monotonic() value.
        Raises NotReady when it disappears, ends or misses the deadline."""
        last = None
        delays = self.poll_delays()
        while time.monotonic() < deadline:
            try:
                inst = self.get(instance_id)
            except NotFound:
                raise NotReady(f"{self.name} instance {instance_id} disappeared while starting") from None
            if inst.status in (Status.TERMINATING, Status.TERMINATED, Status.STOPPED):
                raise NotReady(f"{self.name} instance {instance_id} is {inst.raw_status} instead of starting")
            ep = inst.endpoint
            if inst.status == Status.RUNNING and ep is not None and ssh_banner(ep.host, ep.port):
                return ep
            last = inst.raw_status
            time.sleep(next(delays))
        raise NotReady(f"{self.name} instance {instance_id} not reachable over SSH in time (last status: {last})")

    def wait_terminated(self, instance_id: str, deadline: float) -> None:
        """Until the cloud says the instance is terminated or no longer knows it."""
        while time.monotonic() < deadline:
            try:
                inst = self.get(instance_id)
            except NotFound:
                return
            if inst.status == Status.TERMINATED:
                return
            time.sleep(self.poll_interval)
        raise CloudError(f"{self.name} instance {instance_id} still not terminated: check the console")

    def terminate_and_wait(self, instance_id: str, deadline: float) -> None:
        """Terminate, treating "already gone" and "already ending" as success, and wait until the
        API confirms."""
        try:
            self.terminate(instance_id)
        except NotFound:
            return
        self.wait_terminated(instance_id, deadline)
