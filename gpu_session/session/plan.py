"""Planning a session: the options a person gives `up`, and every offer that fits, cheapest first,
across the clouds they hold keys for. SessionError says what to do when nothing fits. The one place
the session's defaults live (UpOptions): the face, the user's config file and the stack's config
start from them."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from gpu_session import fit, sizing
from gpu_session.clouds import API_KEY_CONFIG, CLOUDS, Cloud, Offer, get_cloud
from gpu_session.clouds import API_KEY_ENV as KEY_ENV
from gpu_session.errors import GpuSessionError, our_command
from gpu_session.local import record
from gpu_session.stack.automation import StackNotFound, engine
from gpu_session.stack.config import StackConfig, default_device

if TYPE_CHECKING:
    from .cache import CacheInfo

Say = Callable[[str], None]  # progress, one line at a time


class SessionError(GpuSessionError, RuntimeError):
    """What went wrong, and what to do."""


@dataclass(frozen=True)
class UpOptions:
    """What `up` is asked for. The defaults are the stack config's (gpu_session.stack.config), so a
    session started by `invoke up` and a stack applied with `pulumi up` mean the same."""

    model: str  # a Hub id (owner/name) or a catalog alias
    cloud: str = "auto"  # lambda, runpod, or auto: the cheapest among the clouds with a key
    gpu: str = StackConfig.gpu  # auto, or an instance type / GPU name
    gpus: int = StackConfig.gpuCount
    hours: float = StackConfig.hours  # the lease
    max_price: float | None = StackConfig.maxPricePerHour  # USD/h
    budget: float | None = None  # USD: the watch ends the session when it is spent
    disk: int | None = StackConfig.diskGb  # GiB; None: sized from the weights (it can only be raised)
    context: int | None = StackConfig.context  # tokens the offer must hold at least; None: the model's own, at most 8,192
    trust_remote_code: bool = StackConfig.trustRemoteCode  # load code from the model's repo (auto_map)
    quantize: bool = StackConfig.quantize
    backend: str = StackConfig.backend  # auto, vllm or transformers
    stack: str = "dev"
    configure: bool = StackConfig.configure  # False: just the machine, no model server
    cache: bool = True  # use a cache volume (`gpu-session cache create`) in a region that has the chosen GPU
    cache_gated: bool = StackConfig.cacheGated  # a gated or private model's weights may go on the cache too


@dataclass(frozen=True)
class Plan:
    offer: Offer
    region: str | None  # None: any
    need_gb: float  # GiB of room the model needs at the asked context (weights and KV cache), up to 0.1
    hours: float
    budget: float | None = None  # USD: the watch ends the session when it is spent
    context: int = 0  # tokens this offer serves (the most its KV cache holds, capped at the model's own); 0: the engine's
    weights_gb: float = 0.0  # GiB of weights the engine loads (the host downloads these and the small files)
    download_bytes: int = 0  # what the host downloads (the weights and the small files): what a cache volume holds of the model
    disk_gb: int = 0  # GiB
    backend: str = "vllm"
    cpu_capped: bool = False  # the host serves on the CPU (the simulator's), whose KV cache space holds less than the GPU would
    cache: CacheInfo | None = None  # the cache volume the session attaches (gpu_session.session.cache)
    cache_note: str = ""  # why a cache there is goes unused, when one does; or what may go wrong with the one used
    cache_weights: bool = True  # the weights may go on a cache (sizing.ModelInfo.may_cache: public, or --cache-gated)
    # Why the attached cache keeps the engine alone though the weights may go on one: it cannot hold
    # them beside the engine ("" where it can). The stack's cacheWeights is false then.
    room_note: str = ""
    needs_token: bool = False  # the model is gated or private: the host downloads it with the HF token, and gets it only then
    need_bytes: int = 0  # need_gb in bytes, unrounded (0: not known; need_gb stands for it)

    @property
    def weights_cached(self) -> bool:
        """The weights go on the attached cache: they may, and it has room for them."""
        return self.cache is not None and self.cache_weights and not self.room_note

    def weights_off(self) -> str:
        """Why the weights stay off the attached cache ("" where they go on it, or there is none)."""
        if self.cache is None or self.weights_cached:
            return ""
        return self.room_note or "this model is gated or private: --cache-gated keeps them"

    def cache_line(self) -> str:
        """What the plan does about caches, in a line ("" when there are none)."""
        if self.cache is None:
            return self.cache_note
        c = self.cache
        # Lambda bills what a filesystem holds: an empty one's $0.00 would mislead, so the most this
        # session can add is said too (the engine's venv and the weights, when neither is there yet).
        kept_gib = fit.ENGINE_VENV_GIB + (self.weights_gb if self.weights_cached else 0)
        up_to = c.monthly_usd + c.price_per_gb_month * kept_gib * fit.GIB / 1e9
        kept = f"engine (about {fit.ENGINE_VENV_GIB} GiB)" + (" and weights are" if self.weights_cached else " is")
        cost = (
            f"(it costs ${c.monthly_usd:.2f}/month whether used or not)"
            if c.cloud_sized
            else f"(it bills what it holds, ${c.price_per_gb_month:.2f}/GB-month: ${c.monthly_usd:.2f}/month now, up to "
            f"${up_to:.2f} if this session's {kept} not on it yet)"
        )
        weights = f"{self.weights_gb} GiB of weights" if self.weights_gb >= 0.1 else "weights (under 0.1 GiB)"
        warning = f"; {self.cache_note}" if self.cache_note else ""
        if not self.weights_cached:
            return (f"cache {c.cloud} {c.region}: the engine is kept on it, and taken from it where an earlier session left it "
                    f"{cost}; the {weights} are not: {self.weights_off()}{warning}")  # fmt: skip
        return (f"cache {c.cloud} {c.region}: the engine and the {weights} are kept on it, and taken "
                f"from it where an earlier session left them {cost}{warning}")  # fmt: skip

    @property
    def estimate(self) -> float:
        return round(self.offer.price_per_hour * self.hours, 2)

    def describe(self) -> str:
        o = self.offer
        ends = (datetime.now(UTC) + timedelta(hours=self.hours)).strftime("%H:%M UTC")
        room = sizing.room_for(fit.room(o.memory_mib, o.gpu_count), self.need_bytes or int(self.need_gb * sizing.GIB))
        context = f"{self.context:,} tokens of context" if self.context else "the engine's context"
        if self.cpu_capped:
            context += " on this host's CPU engine, whose KV cache space caps it"
        return (f"{o.cloud}: {o.gpu_name} ×{o.gpu_count} ({room}; {context}) in "
                f"{self.region or 'any region'}, ${o.price_per_hour:.2f}/h; {self.hours:g} h lease ≈ ${self.estimate:.2f}, ends {ends}"
                + (f"; the ${self.budget:g} budget ends it after {self.budget / o.price_per_hour:.2g} h"
                   if self.budget is not None and self.budget < self.estimate else ""))  # fmt: skip

    def summary(self, model: str) -> dict:
        """The plan as `up --dry-run --json` prints it (sizes in GiB, price in USD/h)."""
        o = self.offer
        return {"ok": True, "model": model, "cloud": o.cloud, "instance_type": o.instance_type, "gpu": o.gpu_name,
                "gpu_count": o.gpu_count, "region": self.region, "price_per_hour": o.price_per_hour,
                "weights_gb": self.weights_gb, "need_gb": self.need_gb, "context": self.context, "disk_gb": self.disk_gb,
                "backend": self.backend,
                "cache": {"cloud": self.cache.cloud, "region": self.cache.region, "volume_id": self.cache.volume.id,
                          "weights": self.weights_cached, "weights_note": self.weights_off() or None}
                if self.cache else None, "cache_note": self.cache_note or None}  # fmt: skip


def cloud_client(name: str) -> Cloud:
    """The client for a cloud, with its key from the environment; SessionError saying how to give one."""
    if not os.environ.get(KEY_ENV[name]):
        raise SessionError(
            f'no {name} API key: export {KEY_ENV[name]}=... (or run against the simulator: eval "$({our_command("sim --env", quoted=False)})")'
        )
    return get_cloud(name, api_key=os.environ[KEY_ENV[name]])


def clouds_for(choice: str) -> list[str]:
    """The clouds `choice` (lambda, runpod or auto) means: for auto, those with a key here."""
    if choice == "auto":
        found = [c for c in CLOUDS if os.environ.get(KEY_ENV[c])]
        if not found:
            raise SessionError(
                f"no cloud API key: export {' or '.join(KEY_ENV.values())} ({our_command('setup')} saves them),"
                " or pass --sim to use the simulator"
            )
        return found
    if choice not in CLOUDS:
        raise SessionError(f"unknown cloud {choice!r}: choose {', '.join(CLOUDS)} or auto")
    return [choice]


def prepare(opts: UpOptions) -> tuple[UpOptions, list[Plan]]:
    """Everything `up` knows before it launches: the model resolved and described by the Hub,
    every preflight check (gpu_session.sizing.preflight, the disk), and the plans, cheapest first.
    The options with the model's Hub id. Raises SessionError saying what to do; launches nothing."""
    clouds_for(opts.cloud)  # no key for any cloud: said before the Hub is asked
    try:
        opts = replace(opts, model=sizing.resolve(opts.model))
        info = sizing.model_info(opts.model)
        sizing.preflight(info, context=opts.context, trust_remote_code=opts.trust_remote_code)
        disk = info.check_disk(opts.disk)
    except sizing.SizingError as e:
        raise SessionError(str(e)) from None
    return opts, plans(opts, info, disk=disk)


def plans(opts: UpOptions, info: sizing.ModelInfo, *, disk: int = 0) -> list[Plan]:
    """Every (offer, region) that holds the model at the asked context, cheapest first, across the allowed clouds."""
    context = info.default_context(opts.context)
    need = info.need_bytes(context, opts.quantize)
    offers = [o for c in clouds_for(opts.cloud) for o in cloud_client(c).offers()]
    gpu = None if opts.gpu == "auto" else opts.gpu
    if gpu and not any(gpu in (o.instance_type, o.gpu_name) for o in offers):
        raise SessionError(f"no GPU type {gpu!r} here; {our_command('available')} lists them")
    limits = dict(gpu_count=opts.gpus, max_price=opts.max_price, gpu_type=gpu)
    device = default_device()
    backend = info.backend(device) if opts.backend == "auto" else opts.backend
    found = [
        Plan(o, r, info.need_gb(context, opts.quantize), opts.hours, opts.budget, context=info.context_on(o, opts.quantize, device),
             weights_gb=round(info.weights_bytes / sizing.GIB, 1), download_bytes=info.download_bytes, disk_gb=disk, backend=backend,
             cache_weights=info.may_cache(opts.cache_gated), needs_token=bool(info.gated or info.private), need_bytes=need,
             cpu_capped=info.context_on(o, opts.quantize, device) < info.context_on(o, opts.quantize))
        for o in sizing.fitting(offers, need, **limits) for r in o.launch_regions()
    ]  # fmt: skip
    if not found:
        why = sizing.explain_no_fit(offers, need, **limits)
        raise SessionError(f"{opts.model} {why} (for {context:,} tokens of context)")
    return with_caches(found, clouds_for(opts.cloud)) if opts.cache else without_caches(found, clouds_for(opts.cloud))


def without_caches(found: list[Plan], clouds: list[str]) -> list[Plan]:
    """The plans of `up --no-cache`: the first says which caches of `clouds` it leaves unused."""
    from .cache import named

    unused = named(clouds)
    return (
        [replace(found[0], cache_note=f"no cache: --no-cache leaves {', '.join(unused)} unused"), *found[1:]] if unused else found
    )


def with_caches(found: list[Plan], clouds: list[str]) -> list[Plan]:
    """The plans with the caches of `clouds` attached where one is in the plan's region: for each
    offer (cheapest first, as found), its plans with a cache before those without. A RunPod plan
    (any data center) gets a variant in each cache's data center, and keeps its own after them, for
    when that data center has no capacity. The first plan says so when a cache goes unused. Only
    caches at the API this shell points at are offered: the simulator's volumes to a simulated up,
    the real clouds' to a real one."""
    from .cache import at_this_api, caches  # the cache stacks: above plan in the session layer

    ready = [c for c in caches() if c.cloud in clouds and c.volume is not None and at_this_api(c.cloud, c.endpoint)]
    # The model is the same in every plan. A cache whose size (RunPod's, or the soft cap a Lambda
    # filesystem was given) is less than the engine and the model keeps the engine alone (the weights
    # download to the host, as without a cache). One too small to build even the engine on (RunPod's
    # size is enforced: the host stops before it installs) or to hold it (a Lambda soft cap) goes
    # unused. One that holds both, but not the room an engine's install takes besides, serves where an
    # earlier session built the engine; on an empty RunPod volume the host stops before it downloads:
    # the plan says so.
    engine, weights = fit.ENGINE_VENV_GIB * fit.GIB, found[0].download_bytes
    model = weights if found[0].cache_weights else 0
    kept, build = engine + model, fit.cache_need(model)

    def holds(c, size: int) -> bool:
        return c.size_gb is None or c.size_gb * fit.GB >= size

    small = [c for c in ready if not holds(c, fit.cache_need(0) if c.cloud_sized else engine)]
    ready = [c for c in ready if c not in small]
    tight = [c for c in ready if c.cloud_sized and model and holds(c, kept) and not holds(c, build)]
    if not ready:
        return (
            [replace(found[0], cache_note="no cache: " + _too_small(small, fit.cache_need(weights))), *found[1:]]
            if small
            else found
        )
    order = {id(p.offer): n for n, p in enumerate(found)}
    out = []
    for plan in found:
        here = [c for c in ready if c.cloud == plan.offer.cloud and plan.region in (None, c.region)]
        out += [replace(plan, region=c.region, cache=c, room_note="" if holds(c, engine + weights) else _no_room(c, plan))
                for c in here]  # fmt: skip
        if plan.region is None or not here:
            out.append(plan)
    # For each offer (cheapest first): a cache that keeps the weights too, one that keeps the engine alone, none.
    out.sort(key=lambda p: (order[id(p.offer)], p.cache is None, bool(p.room_note)))
    if out[0].cache is None:
        offer = out[0].offer
        here = [c.region for c in ready if c.cloud == offer.cloud]
        elsewhere = [c for c in ready if c.cloud != offer.cloud]
        why = [f"the {offer.cloud} one(s) in {', '.join(here)} are not where {offer.gpu_name} is offered"] if here else []
        why += [f"{c.cloud} {c.region} is on another cloud than this plan's"
                + (f" (`--cloud {c.cloud}` plans there)" if any(p.cache is c for p in out) else ", where no offer fits")
                for c in elsewhere]  # fmt: skip
        why += [_too_small(small, fit.cache_need(weights))] if small else []
        out[0] = replace(out[0], cache_note="no cache: " + "; ".join(why))
    elif out[0].cache in tight:
        out[0] = replace(out[0], cache_note=f"{out[0].cache.size_gb} GB hold this model and its engine (about "
                         f"{kept / fit.GB:.0f} GB) but not the room to install the engine ({build / fit.GB:.1f} GB): "
                         "if no earlier session left the engine on it, the host stops before it downloads")  # fmt: skip
    return out


def _size(c: CacheInfo) -> str:
    return f"{c.size_gb} GB" if c.cloud_sized else f"soft cap of {c.size_gb} GB"


def _no_room(c: CacheInfo, plan: Plan) -> str:
    """Why cache `c` keeps the engine alone (it cannot hold the plan's model beside it), and how
    to have one that keeps both."""
    both = fit.ENGINE_VENV_GIB * fit.GIB + plan.download_bytes
    return (f"its {_size(c)} cannot hold them beside the engine ({both / fit.GB:.1f} GB together), so the host downloads "
            f"them as without a cache; to keep both, {_bigger(c, fit.cache_need(plan.download_bytes))}")  # fmt: skip


def _too_small(small: list[CacheInfo], need: int) -> str:
    """Why the caches in `small` go unused (too small to build an engine on, or for a Lambda soft
    cap to hold one), and how to have ones with room for `need` bytes, the engine's install and the model."""
    return (f"too small for an engine: {', '.join(f'{c.cloud} {c.region} ({c.size_gb} GB)' for c in small)}, where an engine "
            f"takes {fit.ENGINE_VENV_GIB * fit.GIB / fit.GB:.1f} GB (and {fit.cache_need(0) / fit.GB:.1f} GB free to install it); "
            "to keep it and this model: " + "; ".join(_bigger(c, need) for c in small))  # fmt: skip


def _bigger(c: CacheInfo, need: int) -> str:
    """How to have a cache like `c` with room for `need` bytes and 1 GB to spare (in tens of GB)."""
    size = math.ceil((need / fit.GB + 1) / 10) * 10
    if c.cloud == "lambda":
        return f"{our_command(f'cache create --cloud lambda --region {c.region} --size {size}')} raises its soft cap"
    from .cache import rm_command

    return (f"one of {size} GB would ({rm_command(c.cloud, c.region)}, then "
            f"{our_command(f'cache create --cloud {c.cloud} --region {c.region} --size {size}')}: what this one holds goes)")  # fmt: skip


def stack_settings(opts: UpOptions, plan: Plan) -> dict[str, str]:
    """The stack's config for `plan` (gpu_session.stack.config's keys, as text). The stack holds its
    own credentials (as secrets), so `down` works from any shell; the HF token only for a gated or
    private model (Plan.needs_token): a rented host never holds a token it does not need, and a
    secret fewer is a CLI process fewer (each derives the passphrase's key, about 0.5 s)."""
    config = {
        "model": opts.model, "cloud": plan.offer.cloud, "gpu": plan.offer.instance_type, "gpuCount": str(plan.offer.gpu_count),
        "region": plan.region or "auto", "hours": str(opts.hours), "diskGb": str(plan.disk_gb),
        "trustRemoteCode": str(opts.trust_remote_code).lower(),
        "quantize": str(opts.quantize).lower(), "backend": opts.backend, "configure": str(opts.configure).lower(),
        "device": default_device(),
    }  # fmt: skip
    if opts.max_price is not None:
        config["maxPricePerHour"] = str(opts.max_price)
    if opts.context is not None:
        config["context"] = str(opts.context)
    if plan.cache is not None:
        config["cacheVolume"] = plan.cache.volume.id
        config["cacheGated"] = str(opts.cache_gated).lower()
        config["cacheWeights"] = "false" if plan.room_note else "true"  # the volume holds the engine alone
    for cloud, key in API_KEY_CONFIG.items():
        if os.environ.get(KEY_ENV[cloud]):
            config[key] = os.environ[KEY_ENV[cloud]]
    if plan.needs_token and os.environ.get("HF_TOKEN"):
        config["hfToken"] = os.environ["HF_TOKEN"]
    return config


def use_session(stack: str, config: dict[str, str] | None = None) -> None:
    """Point this process at where `stack`'s session lives, so a command on it works from any
    shell: the record's environment (the simulator's addresses, or none for the real clouds) and
    the cloud keys the stack holds (its secret config, set by `up`; `config` when the caller has
    it, else asked of the engine only when a key is missing), wherever the environment has none."""
    live = record.find(stack)
    for name, value in record.environment_of(stack).items():
        os.environ.setdefault(name, value)
    clouds = [live.cloud] if live else CLOUDS
    if config is None and any(not os.environ.get(KEY_ENV[c]) for c in clouds):
        try:
            config = engine(stack, create=False).config()
        except StackNotFound:
            return
    for cloud, key in API_KEY_CONFIG.items():
        if (config or {}).get(key) and not os.environ.get(KEY_ENV[cloud]):
            os.environ[KEY_ENV[cloud]] = config[key]


@contextmanager
def in_session(stack: str):
    """For one stack among several (status): its own cloud and keys while the block runs, whatever
    this shell exports (a session on the simulator and one on a real cloud are each asked of their
    own), and this process's environment back after."""
    saved = dict(os.environ)
    for name in (*record.ENVIRONMENT, *KEY_ENV.values()):
        os.environ.pop(name, None)
    try:
        use_session(stack)
        for name in KEY_ENV.values():  # a stack that holds no key of a cloud: the shell's, as before
            if not os.environ.get(name) and saved.get(name):
                os.environ[name] = saved[name]
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
