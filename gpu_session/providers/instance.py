"""GpuInstance: one GPU instance on Lambda or RunPod, through gpu_session.clouds.

create launches idempotently by the deterministic name (an instance already running under it is
adopted). With gpu_type "auto" it takes the cheapest offer whose room (gpu_session.fit.room) holds min_vram_gb GiB, within
max_price_per_hour, and on a capacity error moves on to the next region or type; the choice is made
at launch, so a later `up` with the same inputs keeps the machine it has. It then waits until SSH answers under its own deadline (Pulumi's custom timeouts do not reach
dynamic providers), and terminates what it launched if anything after the launch fails, so a
failed create leaves nothing billing. With volume_id it attaches that cache volume (a Lambda
filesystem, a RunPod network volume) and launches only in its region; the host sees it at the
output cache_path. read notices an instance ended outside Pulumi; delete treats
"already gone" as success and waits until the API says terminated.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pulumi
from pulumi.dynamic import (
    CheckFailure,
    CheckResult,
    CreateResult,
    DiffResult,
    ReadResult,
    Resource,
    ResourceProvider,
    UpdateResult,
)

from gpu_session import progress
from gpu_session.clouds import CLOUDS, CapacityError, CloudError, LaunchSpec, NotFound, Volume, cloud_class
from gpu_session.clouds.base import validate_name
from gpu_session.errors import our_command
from gpu_session.sizing import GIB, SizingError, explain_no_fit, fitting

from .credentials import CloudAccess

# Changing any of these means another machine: replace (terminate first: GPUs are scarce and billed).
REPLACE_ON = (
    "cloud",
    "name",
    "gpu_type",
    "gpu_count",
    "region",
    "image",
    "disk_gb",
    "ssh_public_key",
    "ssh_key_name",
    "user_data",
    "volume_id",
)
OUTPUTS = (
    "instance_id",
    "instance_type",
    "host",
    "port",
    "user",
    "status",
    "gpu_name",
    "vram_gb",
    "price_per_hour",
    "launched_at",
    "cache_path",
    "cache_size_gb",
)
AUTO = "auto"
DEFAULT_READY_TIMEOUT_S = 900


class GpuInstanceProvider(CloudAccess, ResourceProvider):
    def check(self, olds, news):
        failures = []
        if news.get("cloud") not in CLOUDS:
            failures.append(CheckFailure("cloud", f"must be one of {', '.join(CLOUDS)} (got {news.get('cloud')!r})"))
        try:
            validate_name(str(news.get("name", "")))
        except CloudError as e:
            failures.append(CheckFailure("name", str(e)))
        if not news.get("gpu_type"):
            failures.append(CheckFailure("gpu_type", "an instance type (Lambda) or GPU type (RunPod) is needed"))
        if news.get("gpu_type") == AUTO and news.get("min_vram_gb") is None:
            failures.append(CheckFailure("min_vram_gb", 'gpu_type "auto" needs the memory the model needs (GB)'))
        for key, low in (("gpu_count", 1), ("disk_gb", 1), ("ready_timeout_s", 30)):
            value = news.get(key)
            if value is not None and (not isinstance(value, int | float) or int(value) != value or value < low):
                failures.append(CheckFailure(key, f"must be a whole number of at least {low} (got {value!r})"))
        if news.get("cloud") in CLOUDS:
            if cloud_class(news["cloud"]).registers_ssh_keys and not news.get("ssh_key_name"):
                failures.append(CheckFailure("ssh_key_name", f"{news['cloud']} launches need a registered SSH key's name"))
            if not cloud_class(news["cloud"]).registers_ssh_keys and not news.get("ssh_public_key"):
                failures.append(CheckFailure("ssh_public_key", f"{news['cloud']} launches need the session's public key"))
        return CheckResult(news, failures)

    def diff(self, id_, olds, news):  # olds are the previous outputs, which carry the inputs
        def differs(key: str) -> bool:
            # No region asked for means any region: the one the instance landed in is not a change.
            return olds.get(key) != news.get(key) and not (key == "region" and not news.get(key))

        changed = [k for k in news if k != "__provider" and k not in OUTPUTS and differs(k)]
        replaces = [k for k in REPLACE_ON if k in changed]
        # A model that needs more memory than the machine has: another machine. Less: keep this one.
        # Unknown memory (a type named outright: `invoke up` always names one) never replaces: the
        # host's own check says whether the model fits, and a new estimate must not end a session.
        if "min_vram_gb" in changed and olds.get("vram_gb") and float(news.get("min_vram_gb") or 0) > float(olds["vram_gb"]):
            replaces.append("min_vram_gb")
        return DiffResult(changes=bool(changed), replaces=replaces, delete_before_replace=True)

    def create(self, props):
        cloud = self.cloud(props["cloud"])
        deadline = time.monotonic() + int(props.get("ready_timeout_s") or DEFAULT_READY_TIMEOUT_S)
        volume = self._volume(cloud, props)
        instance_id, vram_gb = self._launch(cloud, props, volume)
        print(f"launched {props['cloud']} instance {instance_id}; waiting for SSH", flush=True)
        print(progress.line("boot", "start", instance_id=instance_id), flush=True)
        try:
            endpoint = cloud.wait_ready(instance_id, deadline)
            outs = {**self._outputs(cloud.get(instance_id), endpoint), "vram_gb": vram_gb,
                    "cache_path": volume.mount_point if volume else None,
                    "cache_size_gb": (volume.size_gb or 0) if volume else None}  # fmt: skip
        except BaseException:
            # Nothing after the launch may leave a billing machine Pulumi does not know about.
            cloud.terminate_and_wait(instance_id, time.monotonic() + 120)
            raise
        return CreateResult(instance_id, {**props, **outs, "launched_at": datetime.now(UTC).isoformat(timespec="seconds")})

    @staticmethod
    def _volume(cloud, props) -> Volume | None:
        """The cache volume to attach (volume_id), as the cloud knows it now; None without one."""
        if not props.get("volume_id"):
            return None
        found = next((v for v in cloud.volumes() if v.id == props["volume_id"]), None)
        if found is None:
            raise CloudError(
                f"the cache volume {props['volume_id']} is gone from {cloud.name}: {our_command('cache list')} shows the "
                f"caches there are; {our_command('up --no-cache')} goes without one"
            )
        return found

    def _launch(self, cloud, props, volume: Volume | None = None) -> tuple[str, float | None]:
        """Launch (or adopt) under the name; the instance id and its total GPU memory when known.
        With a volume, only in the volume's region (a volume is bound to one)."""
        spec = LaunchSpec(
            name=props["name"],
            instance_type=props["gpu_type"],
            region=volume.region if volume else props.get("region") or None,
            gpu_count=int(props.get("gpu_count") or 1),
            ssh_public_key=props.get("ssh_public_key") or "",
            ssh_key_name=props.get("ssh_key_name") or None,
            image=props.get("image") or None,
            disk_gb=int(props["disk_gb"]) if props.get("disk_gb") else None,
            user_data=props.get("user_data") or None,
            volume=volume,
        )
        existing = cloud.find_by_name(spec.name)
        if existing is not None:  # an earlier create that was interrupted: adopt, never launch twice
            return existing.id, props.get("vram_gb")
        if props["gpu_type"] != AUTO and not props.get("max_price_per_hour"):
            return cloud.launch(spec), None
        offers = cloud.offers()
        need = int(float(props.get("min_vram_gb") or 0) * GIB)  # GiB of room (gpu_session.fit.room) → bytes
        limits = dict(
            gpu_count=spec.gpu_count,
            max_price=props.get("max_price_per_hour") or None,
            gpu_type=None if props["gpu_type"] == AUTO else props["gpu_type"],
        )
        tried = []
        for offer in fitting(offers, need, **limits):
            for region in offer.launch_regions():
                if spec.region and region is not None and region != spec.region:
                    continue
                region = region or spec.region  # a cloud that places the machine itself: where it was asked for
                try:
                    instance_id = cloud.launch(
                        LaunchSpec(**{**vars(spec), "instance_type": offer.instance_type, "region": region})
                    )
                except CapacityError:
                    tried.append(f"{offer.instance_type} in {region or 'any region'}")
                    print(f"no capacity for {tried[-1]}; trying the next offer", flush=True)
                    continue
                return instance_id, offer.total_vram_gb
        if tried:
            raise CapacityError(f"no capacity for any offer that fits ({', '.join(tried)})")
        raise SizingError(explain_no_fit(offers, need, **limits))

    def read(self, id_, props):
        try:
            inst = self.cloud(props["cloud"]).get(id_)
        except NotFound:
            return ReadResult("", {})
        if not inst.alive:
            return ReadResult("", {})  # ended outside Pulumi (the console, the lease): drop it
        outs = self._outputs(inst, inst.endpoint)
        kept = {k: props.get(k) for k in ("vram_gb", "launched_at", "cache_path", "cache_size_gb")}
        return ReadResult(id_, {**props, **outs, **kept})

    def update(self, id_, olds, news):  # what does not replace: the deadline, the price limit, a smaller need
        return UpdateResult({**olds, **news, **{k: olds.get(k) for k in OUTPUTS}})

    def delete(self, id_, props):
        self.cloud(props["cloud"]).terminate_and_wait(
            id_, time.monotonic() + int(props.get("ready_timeout_s") or DEFAULT_READY_TIMEOUT_S)
        )

    @staticmethod
    def _outputs(inst, endpoint) -> dict:
        return {
            "instance_id": inst.id,
            "instance_type": inst.instance_type,
            "host": endpoint.host if endpoint else None,
            "port": endpoint.port if endpoint else None,
            "user": endpoint.user if endpoint else None,
            "status": inst.status,
            "gpu_name": inst.gpu_name,
            "gpu_count": inst.gpu_count,
            "price_per_hour": inst.price_per_hour,
            "region": inst.region,
        }


class GpuInstance(Resource, module="gpu_session", name="GpuInstance"):
    instance_id: pulumi.Output[str]
    instance_type: pulumi.Output[str]
    vram_gb: pulumi.Output[float]
    host: pulumi.Output[str]
    port: pulumi.Output[int]
    user: pulumi.Output[str]
    status: pulumi.Output[str]
    gpu_name: pulumi.Output[str]
    price_per_hour: pulumi.Output[float]
    launched_at: pulumi.Output[str]
    cache_path: pulumi.Output[str]  # where the host sees the cache volume; None without one
    cache_size_gb: pulumi.Output[int]  # the volume's size (RunPod); 0 where it grows with use (Lambda)

    def __init__(self, resource_name: str, *, cloud, name, gpu_type, gpu_count=1, region=None, image=None, disk_gb=None,
                 ssh_public_key=None, ssh_key_name=None, user_data=None, min_vram_gb=None, max_price_per_hour=None,
                 volume_id=None, ready_timeout_s=DEFAULT_READY_TIMEOUT_S, opts: pulumi.ResourceOptions | None = None):  # fmt: skip
        inputs = {
            "cloud": cloud, "name": name, "gpu_type": gpu_type, "gpu_count": gpu_count, "region": region, "image": image,
            "disk_gb": disk_gb, "ssh_public_key": ssh_public_key, "ssh_key_name": ssh_key_name, "user_data": user_data,
            "min_vram_gb": min_vram_gb, "max_price_per_hour": max_price_per_hour, "volume_id": volume_id,
            "ready_timeout_s": ready_timeout_s,
            **dict.fromkeys(OUTPUTS),
        }  # fmt: skip
        super().__init__(GpuInstanceProvider(), resource_name, inputs, opts)
