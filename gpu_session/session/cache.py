"""Cache volumes: one long-lived Pulumi stack each (project gpu-session-cache, infra/cache/), one per
cloud and region, that sessions in that region attach (plan.with_caches). `create` brings the
stack up (adopting a volume of its name at the cloud), `caches` lists this machine's cache stacks
joined with what the cloud says of each now, `find` gives one, `rm` deletes one (refused while a
session uses it) and asks the cloud that it is gone. What a cache costs: on RunPod its size, on
Lambda the bytes it holds, times the cloud's price per GB-month, whether a session runs or not.

Bad input changes nothing: it is refused before any stack (or folder) exists, and a create that
fails before the volume exists takes its empty stack away again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import yaml

from gpu_session import fit
from gpu_session.clouds import (
    API_BASE_ENV,
    API_BASE_ENVS,
    API_KEY_CONFIG,
    API_KEY_ENV,
    CLOUDS,
    Cloud,
    CloudError,
    NoSimulator,
    Volume,
    cloud_class,
    get_cloud,
)
from gpu_session.errors import GpuSessionError, our_command
from gpu_session.fit import GB
from gpu_session.local import record
from gpu_session.local.ledger import Ledger
from gpu_session.paths import STACK_NAME, state_dir, write_private
from gpu_session.stack import cache_config, names
from gpu_session.stack.automation import OnEvent, StackError, StackNotFound, engine, workspaces
from gpu_session.stack.config import NAMESPACE, ConfigError

# The smallest cache worth making (GB): the cloud's smallest volume, or room for an engine's install
# (a session keeps the engine alone on a cache that cannot hold its weights too, and plans without
# one too small to install an engine on: plan.with_caches).
MIN_GB = max(cache_config.MIN_GB, -(-fit.cache_need(0) // GB))
Say = Callable[[str], None]  # as plan.Say (plan imports this module: not the other way)
HOURS_PER_MONTH = 730  # the clouds' month (365 × 24 / 12)
ENVIRONMENT_FILE = "environment.json"  # beside a cache stack's workspace: where its cloud was (the simulator's address)


class CacheError(GpuSessionError, ValueError):
    """A cache command cannot go ahead; the message says what to do. Nothing was changed."""


@dataclass(frozen=True)
class CacheInfo:
    """One cache: its stack here, and the volume as its cloud shows it now."""

    cloud: str
    region: str
    stack: str  # the cache project's stack (names.cache_stack)
    volume: Volume | None  # the cloud's live view; None: not at the cloud (gone, or never made), or the cloud did not answer
    volume_id: str = ""  # as the stack records it
    size_gb: int | None = None  # RunPod: the volume's size; Lambda: the soft cap given at create (None: none)
    # What it bills a month now (RunPod: size × price; Lambda: GB used × price); None: unknown (its cloud did not answer).
    monthly_usd: float | None = 0.0
    price_per_gb_month: float = 0.0  # USD
    in_use_by: list[str] = field(default_factory=list)  # session stacks here that attach it (their outputs or config)
    created_at: str = ""  # when it began to bill (ISO, UTC)
    note: str = ""  # what is wrong, when something is: gone at the cloud, the cloud did not answer
    endpoint: str = ""  # the API address it was made at (the simulator's); "" for the cloud's real API
    answered: bool = True  # whether its cloud said which volumes it has (False: not asked, or no answer)

    @property
    def bytes_used(self) -> int | None:
        return self.volume.bytes_used if self.volume else None

    @property
    def in_use(self) -> bool:
        """Attached to a live instance, as the cloud says, or named by a session stack here."""
        return bool(self.in_use_by) or bool(self.volume and self.volume.in_use)

    def so_far_usd(self, now: datetime | None = None) -> float | None:
        """What it has cost since it was made, at today's monthly rate (an estimate on Lambda, where
        the bytes held change); None when its start is unknown."""
        if not self.created_at or self.monthly_usd is None:
            return None
        started = datetime.fromisoformat(self.created_at)
        hours = max(0.0, ((now or datetime.now(UTC)) - started).total_seconds() / 3600)
        return round(self.monthly_usd * hours / HOURS_PER_MONTH, 4)

    def describe(self) -> str:
        """One line: `lambda us-east-1: 12.3 GB used, $2.46/month`."""
        used = (f"{self.bytes_used / GB:.1f} GB used" if self.bytes_used is not None
                else "use not reported" if self.answered else "use unknown")  # fmt: skip
        size = f"{self.size_gb} GB" if self.cloud_sized else (f"soft cap {self.size_gb} GB" if self.size_gb else "grows with use")
        return f"{self.cloud} {self.region}: {size}, {used}, {monthly_text(self.monthly_usd)}" + (
            f" ({self.note})" if self.note else ""
        )

    @property
    def cloud_sized(self) -> bool:
        return cloud_class(self.cloud).sizes_volumes

    @property
    def rm_command(self) -> str:
        return rm_command(self.cloud, self.region)

    @property
    def exists(self) -> bool | None:
        """Whether its cloud has the volume; None when the cloud did not answer (its cost is unknown then)."""
        return True if self.volume is not None else False if self.answered else None

    def as_json(self) -> dict:
        return {
            "cloud": self.cloud, "region": self.region, "stack": self.stack, "volume_id": self.volume_id,
            "volume_name": self.volume.name if self.volume else names.volume_name(self.region),
            "exists": self.exists, "size_gb": self.size_gb, "bytes_used": self.bytes_used,
            "mount_point": self.volume.mount_point if self.volume else None, "in_use": self.in_use,
            "in_use_by": self.in_use_by, "monthly_usd": self.monthly_usd, "price_per_gb_month": self.price_per_gb_month,
            "so_far_usd": self.so_far_usd(), "created_at": self.created_at or None, "note": self.note or None,
        }  # fmt: skip


def rm_command(cloud: str, region: str) -> str:
    """The command that deletes the cache of `cloud` in `region`, as the person runs ours (our_command)."""
    return our_command(f"cache rm --cloud {cloud} --region {region}")


def monthly_text(usd: float | None) -> str:
    """A monthly bill as the commands say it: "$2.46/month", or "cost unknown" (CacheInfo.monthly_usd None)."""
    return "cost unknown" if usd is None else f"${usd:.2f}/month"


def total_text(monthly: list[float | None]) -> str:
    """The caches' monthly bills in all, as the commands say it: "3.50 USD/month", or with a cache
    whose cost is unknown (None), "at least 3.50 USD/month (1 cache's cost unknown: …)"."""
    known, unknown = sum(m for m in monthly if m is not None), sum(m is None for m in monthly)
    if not unknown:
        return f"{known:.2f} USD/month"
    whose = "1 cache's cost unknown: its cloud" if unknown == 1 else f"{unknown} caches' costs unknown: their clouds"
    return f"at least {known:.2f} USD/month ({whose} did not answer)"


def monthly_usd(cloud: str, size_gb: int | None, bytes_used: int | None, price_per_gb_month: float) -> float:
    """A volume's monthly bill: RunPod bills the size, Lambda the bytes held (GB of 10^9 bytes)."""
    if cloud_class(cloud).sizes_volumes:
        return round((size_gb or 0) * price_per_gb_month, 2)
    return round((bytes_used or 0) / GB * price_per_gb_month, 2)


# --- input --------------------------------------------------------------------------------------


def check(cloud: str, region: str, size_gb=None, *, creating: bool = True) -> int | None:
    """The size to ask for (whole GB; None: the cloud's default or none), after refusing what no cloud
    would take, each refusal saying what to do. Asks no cloud and writes nothing."""
    if cloud not in CLOUDS:
        raise CacheError(f"unknown cloud {cloud!r}: --cloud {' or '.join(CLOUDS)}")
    if not region or not names.REGION.match(region):
        example = "a data center id like EU-RO-1" if cloud == "runpod" else "a region like us-east-1"
        raise CacheError(f"invalid region {region!r} for {cloud}: --region takes {example}")
    if cloud == "lambda" and region != region.lower():
        raise CacheError(f"Lambda regions are lowercase: --region {region.lower()}")
    if cloud == "runpod" and region != region.upper():  # every RunPod data center id is (EU-RO-1, CA-MTL-1)
        raise CacheError(f"RunPod data centers are uppercase: --region {region.upper()}")
    if not STACK_NAME.match(names.cache_stack(cloud, region)):
        raise CacheError(f"region {region!r} is too long a name for a cache")
    if not creating or size_gb is None or size_gb == "":
        return None
    text = str(size_gb)
    if isinstance(size_gb, float) and size_gb.is_integer():
        text = str(int(size_gb))
    if not text.isdigit() or not MIN_GB <= int(text) <= cache_config.MAX_GB:
        raise CacheError(
            f"--size takes a whole number of GB from {MIN_GB} to {cache_config.MAX_GB} (got {size_gb!r}): a cache holds the "
            f"engine, whose install needs {fit.ENGINE_DISK_GIB} GiB ({fit.cache_need(0) / GB:.1f} GB), and the weights beside it"
        )
    return int(text)


# --- the cloud, with the keys the stack holds ---------------------------------------------------


def _client(cloud: str, config: dict[str, str] | None = None) -> Cloud:
    """The cloud's client: the cache stack's own key first (the account its volume is in, which the
    stack's provider uses too), else the environment's."""
    env_key, stack_key = os.environ.get(API_KEY_ENV[cloud]), (config or {}).get(API_KEY_CONFIG[cloud])
    key = stack_key or env_key
    if not key:
        raise CacheError(
            f'no {cloud} API key: export {API_KEY_ENV[cloud]}=... (or against the simulator: eval "$({our_command("sim --env", quoted=False)})")'
        )
    return get_cloud(cloud, api_key=key)


def _recorded_environment(stack: str) -> dict[str, str]:
    """Where the cache's cloud was when it was made (the simulator's addresses; {} for the real APIs)."""
    path = workspaces(names.CACHE_PROJECT) / stack / ENVIRONMENT_FILE
    try:
        return {k: v for k, v in json.loads(path.read_text()).items() if k in record.ENVIRONMENT}
    except (OSError, ValueError):
        return {}


@contextmanager
def _in_cache(stack: str, cloud: str) -> Iterator[bool]:
    """While the block runs, this process points where the cache's cloud was (what this shell does not
    say itself), and back after: a cache made on the simulator never sends a later real `up` there,
    and a cache made at the real API is asked there even from a shell pointed at the simulator (else
    it would look gone, `rm` would forget a volume that still bills, and its key would go to the
    simulator). Yields whether the cache has an endpoint of its own."""
    saved = dict(os.environ)
    recorded = _recorded_environment(stack)
    if not any(name in recorded for name in API_BASE_ENVS[cloud]):
        for name in API_BASE_ENVS[cloud]:
            os.environ.pop(name, None)
    for name, value in recorded.items():
        os.environ.setdefault(name, value)
    try:
        yield any(name in API_BASE_ENV.values() for name in recorded)
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --- reading ------------------------------------------------------------------------------------


def _stacks() -> list[str]:
    """The cache stacks of this machine (their workspaces)."""
    root = workspaces(names.CACHE_PROJECT)
    return sorted(f.name for f in root.glob("*") if f.is_dir() and STACK_NAME.match(f.name)) if root.exists() else []


def _session_users() -> dict[str, list[str]]:
    """Volume id → the session stacks here that attach it: a live session's recorded outputs
    (cache_volume_id), or a session stack's config (cacheVolume) while its stack holds a machine."""
    users: dict[str, list[str]] = {}
    for path in sorted((state_dir() / "stacks").glob(f"*/{record.FILE}")):
        try:
            outputs = json.loads(path.read_text()).get("outputs") or {}
        except (OSError, ValueError):
            continue
        if outputs.get("cache_volume_id"):
            users.setdefault(outputs["cache_volume_id"], []).append(path.parent.name)
    for config_file in sorted(workspaces(names.PROJECT).glob("*/Pulumi.*.yaml")):
        stack = config_file.parent.name
        try:
            volume = ((yaml.safe_load(config_file.read_text()) or {}).get("config") or {}).get(f"{NAMESPACE}:cacheVolume")
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(volume, str) or not volume or stack in users.get(volume, []):
            continue
        try:
            holds = bool(engine(stack, create=False).resources())  # an up that failed before launching holds nothing
        except StackError:
            holds = False
        if holds:
            users.setdefault(volume, []).append(stack)
    return users


def _info(stack: str, live: dict[str, list[Volume] | str], users: dict[str, list[str]]) -> CacheInfo | None:
    """The cache of `stack` (None: no such cache stack), with its cloud's view from `live` (cloud →
    its volumes, or the error it gave; filled on first use)."""
    try:
        st = engine(stack, create=False, project=names.CACHE_PROJECT)
    except StackNotFound:
        return None
    config, outputs = st.config(), st.outputs(secrets=False)  # a cache's outputs are all plain
    cloud, region = config.get("cloud") or outputs.get("cloud", ""), config.get("region") or outputs.get("region", "")
    if cloud not in CLOUDS:
        return CacheInfo(cloud, region, stack, None, monthly_usd=None, answered=False,
                         note="the stack names no cloud: `pulumi destroy` it in its workspace")  # fmt: skip
    recorded = _recorded_environment(stack)
    endpoint = tuple(sorted(recorded.items()))  # caches of one cloud on two endpoints: asked apart
    if (cloud, endpoint) not in live:
        with _in_cache(stack, cloud):
            try:
                live[cloud, endpoint] = _client(cloud, config).volumes()
            except (CloudError, CacheError) as e:
                # Made at the simulator, which may just not run now (NoSimulator says so itself).
                hint = " (it was made at the simulator: `--sim` starts one)" if recorded.get(API_BASE_ENV[cloud]) else ""
                live[cloud, endpoint] = f"{cloud} did not answer: {e}" + ("" if isinstance(e, NoSimulator) else hint)
    volume_id = outputs.get("volume_id") or ""
    seen = live[cloud, endpoint]
    volume = next((v for v in seen if v.id == volume_id), None) if volume_id and not isinstance(seen, str) else None
    note = seen if isinstance(seen, str) else "" if volume else ("gone at the cloud" if volume_id else "not created")
    price = cloud_class(cloud).volume_price_per_gb_month
    size = volume.size_gb if volume and volume.size_gb is not None else _int(outputs.get("size_gb") or config.get("sizeGb"))
    return CacheInfo(
        cloud=cloud, region=region, stack=stack, volume=volume, volume_id=volume_id, size_gb=size,
        # Gone: it bills nothing. Unknown when its cloud did not answer: it may bill as before, never said to be $0.
        monthly_usd=monthly_usd(cloud, size, volume.bytes_used, price) if volume else None if isinstance(seen, str) else 0.0,
        price_per_gb_month=price, in_use_by=users.get(volume_id, []) if volume_id else [],
        created_at=outputs.get("created_at") or "", note=note, endpoint=recorded.get(API_BASE_ENV[cloud], ""),
        answered=not isinstance(seen, str),
    )  # fmt: skip


def _int(value) -> int | None:
    try:
        return int(float(value)) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def caches() -> list[CacheInfo]:
    """Every cache stack of this machine, each joined with its cloud's view now (bytes used, in use);
    one whose volume the cloud no longer has is listed with volume None and a note saying so."""
    stacks = _stacks()
    if not stacks:
        return []  # `up` asks on every plan: no cache, no look at the sessions
    live: dict = {}
    users = _session_users()
    found = [_info(stack, live, users) for stack in stacks]
    return [c for c in found if c is not None]


def at_this_api(cloud: str, endpoint: str) -> bool:
    """Whether a cache made at `endpoint` (the simulator's API address; "" for the real cloud's) is
    at the API this shell points at: the simulator's volumes serve a simulated up, the real clouds'
    a real one."""
    return bool(endpoint) == bool(os.environ.get(API_BASE_ENV[cloud]))


def named(clouds: list[str]) -> list[str]:
    """ "cloud region" of each cache of `clouds` on this machine at the API this shell points at, from
    the cache stacks' own files (no CLI process, no cloud asked): what `up --no-cache` leaves unused."""
    found = []
    for stack in _stacks():
        cloud = stack.split("-", 1)[0]
        if cloud not in clouds or not at_this_api(cloud, _recorded_environment(stack).get(API_BASE_ENV[cloud], "")):
            continue
        try:
            config = yaml.safe_load((workspaces(names.CACHE_PROJECT) / stack / f"Pulumi.{stack}.yaml").read_text())
            region = str(config["config"][f"{NAMESPACE}:region"])
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            continue  # no config: never created (`cache list` shows what it is); the stack's name has the region lower-cased only
        found.append(f"{cloud} {region}")
    return found


def find(cloud: str, region: str) -> CacheInfo | None:
    """The cache of `cloud` in `region` on this machine, or None (bad input: CacheError)."""
    check(cloud, region, creating=False)
    stack = names.cache_stack(cloud, region)
    if stack not in _stacks():
        return None
    return _info(stack, {}, _session_users())


# --- changing -----------------------------------------------------------------------------------


def create(cloud: str, region: str, size_gb: int | None = None, *, say: Say, on_event: OnEvent) -> CacheInfo:
    """Make the cache of `cloud` in `region` (or adopt the volume of its name already there; again on
    an existing cache: nothing changes). size_gb: RunPod's volume size (default 50); on Lambda, whose
    filesystems grow with use and bill what they hold, a soft cap kept in the cache's config (CacheInfo.size_gb;
    said so). CacheError for bad input or no key, with nothing made."""
    size = check(cloud, region, size_gb)
    client = _client(cloud)  # no key: said before anything exists
    sized = cloud_class(cloud).sizes_volumes
    if not sized and size is not None:
        say(f"Lambda filesystems have no size (they grow, and bill what they hold): {size} GB is kept as the cache's "
            "soft cap, which Lambda itself does not enforce")  # fmt: skip
    name = names.volume_name(region)
    existing = next((v for v in client.volumes() if v.name == name), None)
    if existing is not None and existing.region != region:
        raise CacheError(f"a {cloud} volume named {name} already exists in {existing.region}, not {region}")
    if sized:
        if existing is not None and size is not None and existing.size_gb not in (None, size):
            raise CacheError(
                f"{name} ({existing.id}) already exists at {cloud} with {existing.size_gb} GB, not {size}: "
                f"{'no --size' if existing.size_gb < MIN_GB else f'--size {existing.size_gb}'} takes it as it is, "
                f"or {rm_command(cloud, region)} first"
            )
        size = size or (existing.size_gb if existing else cache_config.DEFAULT_RUNPOD_GB)
    stack_name = names.cache_stack(cloud, region)
    fresh = stack_name not in _stacks()
    if existing is not None and fresh:
        say(f"{name} ({existing.id}) is already at {cloud}: the cache adopts it")
    settings = {"cloud": cloud, "region": region, **({"sizeGb": str(size)} if size is not None else {})}
    if os.environ.get(API_KEY_ENV[cloud]):  # the stack holds its cloud's key (a secret): list and rm work from any shell
        settings[API_KEY_CONFIG[cloud]] = os.environ[API_KEY_ENV[cloud]]
    stack = engine(stack_name, project=names.CACHE_PROJECT)
    try:
        previous = stack.config()
        if not fresh and previous.get("sizeGb") and size is None:
            settings["sizeGb"] = previous["sizeGb"]
        stack.set_config(settings)
        write_private(
            stack.folder / ENVIRONMENT_FILE, json.dumps({k: v for k, v in os.environ.items() if k in record.ENVIRONMENT})
        )
        stack.up(on_event)
        if not fresh:  # again: the person learns it was there, and what (if anything) this changed
            capped = not sized and size is not None and previous.get("sizeGb") != str(size)
            say(
                f"cache {cloud} {region} was already here: " + (f"its soft cap is now {size} GB" if capped else "nothing changed")
            )
    except (StackError, ConfigError):
        if fresh and not stack.resources():
            stack.remove(force=True)  # nothing was made: nothing is left, not even an empty stack or its folder
        elif not fresh and previous:
            stack.set_config(previous)  # the cache as it was
        raise
    info = find(cloud, region)
    if info is None or info.volume is None:
        raise CacheError(
            f"the {cloud} cache in {region} was made, but {cloud} does not list its volume: {our_command('cache list')}"
        )
    say(f"cache {cloud} {region}: volume {info.volume.name} ({info.volume.id}), {info.describe().split(': ', 1)[1]}")
    return info


def check_deletable(info: CacheInfo) -> None:
    """CacheError, saying what to do, when the cache may not be deleted now: a session here uses it
    (named), an instance has it attached, or its cloud did not answer. Asks the cloud nothing more."""
    cloud, region = info.cloud, info.region
    if info.in_use_by:
        users = ", ".join(info.in_use_by)
        raise CacheError(
            f"cache {cloud} {region} is in use by session stack {users}: {our_command(f'down --stack {info.in_use_by[0]}')} first "
            "(nothing was deleted)"
        )
    if info.volume is not None and info.volume.in_use:
        raise CacheError(
            f"cache {cloud} {region} ({info.volume_id}) is attached to a running {cloud} instance that no session here "
            f"owns: end it first ({our_command('sweep')}; nothing was deleted)"
        )
    if info.volume is None and not info.answered:
        raise CacheError(f"cannot delete the cache {cloud} {region}: {info.note}")


def rm(cloud: str, region: str, *, say: Say, on_event: OnEvent) -> CacheInfo:
    """Delete the cache of `cloud` in `region`: refused while a session uses it (naming the session's
    stack) or while the cloud says an instance has it attached; then destroy and forget its stack,
    then ask the cloud that the volume is gone. What was deleted (its monthly cost is what stops)."""
    info = find(cloud, region)
    if info is None:
        raise CacheError(f"no cache {cloud} {region} here: {our_command('cache list')} shows them")
    check_deletable(info)
    stack = engine(info.stack, create=False, project=names.CACHE_PROJECT)
    config = stack.config()
    with _in_cache(info.stack, cloud):
        stack.destroy(on_event)
        stack.remove()
        left = info.volume_id and any(v.id == info.volume_id for v in _client(cloud, config).volumes())
    if left:
        raise CacheError(
            f"{cloud} still lists volume {info.volume_id} after its stack was destroyed: {our_command('sweep')} deletes it"
        )
    Ledger().cache_deleted(cloud, region, info.volume_id, info.created_at, info.so_far_usd())  # `cost` still counts it
    say(f"deleted cache {cloud} {region}" + (f" (volume {info.volume_id})" if info.volume_id else "")
        + f": {monthly_text(info.monthly_usd)} stops")  # fmt: skip
    return info


# --- sweep --------------------------------------------------------------------------------------


def orphan_volumes(clouds: list[str]) -> list[tuple[str, Volume]]:
    """Volumes at `clouds` named like ours (names.volume_is_ours) that no cache stack here owns. A
    cache stack with no volume yet (a first `cache create` under way, or killed) keeps the volume of
    its name out of the list: it would look like an orphan. CacheError, naming the stack, when a
    cache stack here cannot be read: no volume could then be told from an orphan."""
    owned, pending = set(), set()
    for stack in _stacks():
        try:
            st = engine(stack, create=False, project=names.CACHE_PROJECT)
            outputs, region = st.outputs(), st.config().get("region", "")
        except StackError as e:
            raise CacheError(
                f"cache stack {stack} cannot be read ({e}): sweep cannot tell its volume from an orphan, so it "
                f"deletes none; {our_command('cache list')} shows the caches"
            ) from None
        if outputs.get("volume_id"):
            owned.add(outputs["volume_id"])
        else:
            pending.add(names.volume_name(region))
    return [
        (c, v) for c in clouds for v in _client(c).volumes()
        if names.volume_is_ours(v.name) and v.id not in owned and v.name not in pending
    ]  # fmt: skip


def delete_orphan(cloud: str, volume: Volume) -> None:
    """Delete an orphan volume: CacheError, with nothing deleted, while an instance has it attached."""
    from gpu_session.clouds import NotFound, VolumeInUse

    try:
        _client(cloud).delete_volume(volume.id)
    except NotFound:
        pass
    except VolumeInUse:
        raise CacheError(f"{cloud} volume {volume.name} ({volume.id}) is attached to a running instance: not deleted") from None
