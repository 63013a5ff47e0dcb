"""CacheVolume: a cache volume that outlives sessions (a Lambda persistent filesystem or a RunPod
network volume), the one resource of a cache stack (project gpu-session-cache, infra/cache/).

create asks the cloud for the volume by its name (gpu_session.stack.names.volume_name), adopting
one of that name in that region instead of making a second. read drops it from the state when the
cloud no longer has it. A change of cloud, name or region is another volume: replaced, the old
deleted first; but a volume an instance has attached is never deleted (nor replaced): delete
raises VolumeStillUsed naming it, so the engine stops with nothing changed rather than orphan it
or cut a session's disk away. A RunPod volume's size is not changed here (diff refuses: rm, then
create); a Lambda filesystem has no size, and size_gb there is a soft cap kept in the state.
"""

from __future__ import annotations

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

from gpu_session.clouds import API_KEY_CONFIG, CLOUDS, NotFound, VolumeInUse, cloud_class
from gpu_session.errors import our_command

from .credentials import CloudAccess
from .lifetime import end_with_engine

INPUTS = ("cloud", "name", "region", "size_gb")
REPLACE_ON = ("cloud", "name", "region")
OUTPUTS = ("volume_id", "mount_point", "bytes_used", "created_at")
# Where a cache stack's keys live: ours (what `gpu-session cache create` sets), or the cache
# project's own namespace (what a bare `pulumi config set` in infra/cache/ writes).
NAMESPACES = ("gpu-session", "gpu-session-cache")


class VolumeStillUsed(Exception):
    """The cloud refused to delete the volume: an instance has it attached."""


def sized(cloud: str) -> bool:
    """Whether the cloud's volumes have a size (RunPod) rather than grow with use (Lambda); False
    for a name that is no cloud (the check refuses it)."""
    return cloud in CLOUDS and cloud_class(cloud).sizes_volumes


def whole(value) -> int | None:
    """A size as it crossed gRPC (a float) back to a whole number; None stays None."""
    return None if value is None else int(value)


class CacheVolumeProvider(CloudAccess, ResourceProvider):
    def configure(self, req) -> None:
        end_with_engine()
        self._config_keys = {
            cloud: next((req.config.get(f"{ns}:{key}") for ns in NAMESPACES if req.config.get(f"{ns}:{key}")), None)
            for cloud, key in API_KEY_CONFIG.items()
        }

    def check(self, olds, news):
        failures = []
        if news.get("cloud") not in CLOUDS:
            failures.append(CheckFailure("cloud", f"must be one of {', '.join(CLOUDS)} (got {news.get('cloud')!r})"))
        for key in ("name", "region"):
            if not isinstance(news.get(key), str) or not news[key]:
                failures.append(CheckFailure(key, f"a volume needs a {key}"))
        size = news.get("size_gb")
        if size is not None and (not isinstance(size, int | float) or int(size) != size or size < 1):
            failures.append(CheckFailure("size_gb", f"must be a whole number of GB (got {size!r})"))
        if size is None and sized(str(news.get("cloud"))):
            failures.append(CheckFailure("size_gb", "a RunPod network volume needs a size in GB"))
        return CheckResult(news, failures)

    def diff(self, id_, olds, news):  # olds are the previous outputs, which carry the inputs
        changed = [k for k in INPUTS if (whole(olds.get(k)) if k == "size_gb" else olds.get(k)) != (
            whole(news.get(k)) if k == "size_gb" else news.get(k))]  # fmt: skip
        replaces = [k for k in REPLACE_ON if k in changed]
        if "size_gb" in changed and not replaces and sized(str(news.get("cloud"))):
            raise ValueError(
                f"the {olds.get('name')} network volume is {whole(olds.get('size_gb'))} GB: its size is not changed here. "
                f"Delete it and make it again at {whole(news.get('size_gb'))} GB ({our_command('cache rm')}, then "
                f"{our_command('cache create --size N')}), or keep its size"
            )
        return DiffResult(changes=bool(changed), replaces=replaces, delete_before_replace=True)

    def create(self, props):
        cloud = self.cloud(props["cloud"])
        size = whole(props.get("size_gb"))
        volume = cloud.create_volume(props["name"], props["region"], size if sized(props["cloud"]) else None)
        if sized(props["cloud"]) and volume.size_gb is not None and volume.size_gb != size:
            print(f"adopted {volume.name} ({volume.id}) as it is: {volume.size_gb} GB, not {size}", flush=True)
        else:
            print(f"{props['cloud']} volume {volume.name} ({volume.id}) in {volume.region}", flush=True)
        return CreateResult(
            volume.id, {**props, **self._outputs(volume, props), "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
        )

    def read(self, id_, props):
        volume = next((v for v in self.cloud(props["cloud"]).volumes() if v.id == id_), None)
        if volume is None:
            return ReadResult("", {})  # gone at the cloud: out of the state
        return ReadResult(id_, {**props, **self._outputs(volume, props)})

    def update(self, id_, olds, news):  # a Lambda soft cap only (a RunPod size change is refused in diff)
        return UpdateResult({**olds, **news, **{k: olds.get(k) for k in OUTPUTS}})

    def delete(self, id_, props):
        try:
            self.cloud(props["cloud"]).delete_volume(id_)
        except NotFound:
            pass  # already gone
        except VolumeInUse as e:
            raise VolumeStillUsed(
                f"{props['cloud']} volume {props.get('name')} ({id_}) in {props.get('region')} is attached to a running "
                f"instance, so it was not deleted: end the session that uses it first ({our_command('down --stack S')}; "
                f"{our_command('cache list')} names it). The cloud said: {e}"
            ) from None

    @staticmethod
    def _outputs(volume, props) -> dict:
        return {
            "volume_id": volume.id,
            "mount_point": volume.mount_point,
            "region": volume.region or props["region"],
            # RunPod: the volume's own size; Lambda: the soft cap asked for (None: none)
            "size_gb": volume.size_gb if volume.size_gb is not None else whole(props.get("size_gb")),
            "bytes_used": volume.bytes_used,
        }


class CacheVolume(Resource, module="gpu_session", name="CacheVolume"):
    volume_id: pulumi.Output[str]
    mount_point: pulumi.Output[str]
    region: pulumi.Output[str]
    size_gb: pulumi.Output[int]
    bytes_used: pulumi.Output[int]
    created_at: pulumi.Output[str]

    def __init__(self, resource_name: str, *, cloud, name, region, size_gb=None, opts: pulumi.ResourceOptions | None = None):
        inputs = {"cloud": cloud, "name": name, "region": region, "size_gb": size_gb, **dict.fromkeys(OUTPUTS)}
        super().__init__(CacheVolumeProvider(), resource_name, inputs, opts)
