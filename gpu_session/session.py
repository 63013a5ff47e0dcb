"""The flows a person runs: up, down, sweep, available, cost. The one place that joins the stack,
sizing, the clouds and the ledger (tasks.py only parses options and prints).

Money first: `up` shows what it will cost and asks before it spends; `down` does not trust the
stack's word that the machine is gone but asks the cloud, and sweeps for anything of the stack's
that is still there; `sweep` finds instances and keys of ours that no stack owns.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from . import sizing, tunnel, watch
from .clouds import API_KEY_ENV as KEY_ENV
from .clouds import CLOUDS, Cloud, Instance, NotFound, Offer, get_cloud
from .configure import ConfigureError, remove_orphaned_runs
from .ledger import Ledger, Session
from .paths import STACK_NAME, stack_dir, state_dir, write_private
from .providers.credentials import CONFIG_KEYS
from .ssh import Endpoint
from .stack import OnEvent, StackError, StackNotFound, engine

PREFIX = "gpu-session-"  # <project>-<stack>-gpu: what the program names instances and keys
Say = Callable[[str], None]


class SessionError(RuntimeError):
    """What went wrong, and what to do."""


@dataclass(frozen=True)
class UpOptions:
    model: str
    cloud: str = "auto"
    gpu: str = "auto"
    gpus: int = 1
    hours: float = 2.0
    max_price: float | None = None
    budget: float | None = None
    disk: int = 100
    quantize: bool = False
    backend: str = "auto"
    stack: str = "dev"
    configure: bool = True  # False: just the machine, no model server


@dataclass(frozen=True)
class Plan:
    offer: Offer
    region: str | None  # None: any
    need_gb: float
    hours: float
    budget: float | None = None  # USD: the watch ends the session when it is spent

    @property
    def estimate(self) -> float:
        return round(self.offer.price_per_hour * self.hours, 2)

    def describe(self) -> str:
        o = self.offer
        ends = (datetime.now(UTC) + timedelta(hours=self.hours)).strftime("%H:%M UTC")
        return (f"{o.cloud}: {o.gpu_name} ×{o.gpu_count} ({o.total_vram_gb} GB for {self.need_gb} GB needed) in "
                f"{self.region or 'any region'}, ${o.price_per_hour:.2f}/h; {self.hours:g} h lease ≈ ${self.estimate:.2f}, ends {ends}"
                + (f"; the ${self.budget:g} budget ends it after {self.budget / o.price_per_hour:.2g} h"
                   if self.budget is not None and self.budget < self.estimate else ""))  # fmt: skip


def use_simulator(say: Say) -> dict[str, str]:
    """Point this process at the simulator (`--sim`), starting one in the background when none is
    running. The environment used; SessionError when the simulator does not start, and
    PulumiMissing (saying how to install it) before anything starts when the Pulumi CLI is missing."""
    import requests

    from . import daemon
    from .sim import default_state_dir
    from .stack import pulumi_binary

    pulumi_binary()  # a rehearsal runs the real engine: say how to get it before starting anything
    info_file = default_state_dir() / "sim.json"

    def answering() -> dict | None:
        if not info_file.exists():
            return None
        info = json.loads(info_file.read_text())
        try:
            requests.get(info["url"] + "/_sim/state", headers={"X-Sim-Admin": info["admin_token"]}, timeout=5).raise_for_status()
        except requests.RequestException:
            return None
        return info

    info = answering()
    if info is None:
        say("starting the cloud simulator in the background (the first start builds its small models)")
        log = daemon.log_path("sim", "simulator")
        write_private(log, "")  # 0600: the simulator prints its keys
        with open(log, "ab") as out:
            subprocess.Popen([sys.executable, "-m", "gpu_session.sim", "--boot-delay", "1", "--no-rate-limits"],
                             stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 300
        while (info := answering()) is None:
            if time.monotonic() > deadline:
                raise SessionError(f"the simulator did not start: {log.read_text()[-500:]}")
            time.sleep(0.5)
    env = dict(info["env"])
    os.environ.update(env)
    return env


def cloud_client(name: str) -> Cloud:
    if not os.environ.get(KEY_ENV[name]):
        raise SessionError(
            f'no {name} API key: export {KEY_ENV[name]}=... (or run against the simulator: eval "$(invoke sim --env)")'
        )
    return get_cloud(name, api_key=os.environ[KEY_ENV[name]])


def clouds_for(choice: str) -> list[str]:
    if choice == "auto":
        found = [c for c in CLOUDS if os.environ.get(KEY_ENV[c])]
        if not found:
            raise SessionError(f"no cloud API key: export {' or '.join(KEY_ENV.values())}")
        return found
    if choice not in CLOUDS:
        raise SessionError(f"unknown cloud {choice!r}: choose {', '.join(CLOUDS)} or auto")
    return [choice]


def plans(opts: UpOptions, info: sizing.ModelInfo) -> list[Plan]:
    """Every (offer, region) that fits, cheapest first, across the allowed clouds."""
    need = info.need_gb(opts.quantize)
    offers = [o for c in clouds_for(opts.cloud) for o in cloud_client(c).offers()]
    gpu = None if opts.gpu == "auto" else opts.gpu
    if gpu and not any(gpu in (o.instance_type, o.gpu_name) for o in offers):
        raise SessionError(f"no GPU type {gpu!r} here; `invoke available` lists them")
    fit = sizing.fitting(offers, need, gpu_count=opts.gpus, max_price=opts.max_price, gpu_type=gpu)
    found = [Plan(o, None if r == "any" else r, need, opts.hours, opts.budget) for o in fit for r in o.regions]
    if not found:
        why = sizing.explain_no_fit(offers, need, gpu_count=opts.gpus, max_price=opts.max_price, gpu_type=gpu)
        raise SessionError(f"{opts.model} {why}")
    return found


def stack_config(opts: UpOptions, plan: Plan) -> dict[str, str]:
    config = {
        "model": opts.model, "cloud": plan.offer.cloud, "gpu": plan.offer.instance_type, "gpuCount": str(plan.offer.gpu_count),
        "region": plan.region or "auto", "hours": str(opts.hours), "diskGb": str(opts.disk),
        "quantize": str(opts.quantize).lower(), "backend": opts.backend, "configure": str(opts.configure).lower(),
    }  # fmt: skip
    if opts.max_price is not None:
        config["maxPricePerHour"] = str(opts.max_price)
    # The stack holds its own credentials (as secrets), so `down` works from any shell.
    for key, var in (("lambdaApiKey", "LAMBDA_API_KEY"), ("runpodApiKey", "RUNPOD_API_KEY"), ("hfToken", "HF_TOKEN")):
        if os.environ.get(var):
            config[key] = os.environ[var]
    return config


def up(opts: UpOptions, *, confirm: Callable[[Plan], bool], say: Say, on_event: OnEvent) -> dict:
    """Plan, ask, bring the stack up (failing over on capacity), record it. The outputs, or {} if declined."""
    stack = engine(opts.stack)
    if stack.outputs().get("instance_id"):
        raise SessionError(
            f"stack {opts.stack} is already up: `invoke chat --stack {opts.stack}`, or `invoke down --stack {opts.stack}`"
        )
    try:
        opts = replace(opts, model=sizing.resolve(opts.model))
        info = sizing.model_info(opts.model)
    except sizing.SizingError as e:
        raise SessionError(str(e)) from None
    candidates = plans(opts, info)
    if not confirm(candidates[0]):
        return {}
    for n, plan in enumerate(candidates):
        stack.set_config(stack_config(opts, plan))
        try:
            outputs = stack.up(on_event)
        except StackError as e:
            if ("CapacityError" in str(e) or "no capacity" in str(e)) and n + 1 < len(candidates):
                say(
                    f"no capacity: {plan.offer.gpu_name} in {plan.region or 'any region'} on {plan.offer.cloud}; trying {candidates[n + 1].describe()}"
                )
                continue
            raise
        Ledger().open(Session(opts.stack, outputs["cloud"], outputs["instance_id"], outputs.get("gpu") or plan.offer.gpu_name,
                              opts.model, float(outputs["price_per_hour"]), time.time(), budget=opts.budget))  # fmt: skip
        remember(opts.stack, outputs)
        if opts.budget is not None or outputs["cloud"] == "lambda":
            watch.start(opts.stack)  # the budget, and the lease end where the host cannot end itself
        if opts.configure:
            outputs = {**outputs, "tunnel_port": tunnel.start(opts.stack).port}
        return outputs
    raise SessionError("no offer could be launched")  # not reached: the last failure is raised above


def remember(stack: str, outputs: dict) -> None:
    """What status, tunnel and ssh need without asking the engine (outputs hold no secret)."""
    write_private(stack_dir(stack) / "outputs.json", json.dumps(outputs))
    write_private(stack_dir(stack) / "endpoint.json", json.dumps(vars(Endpoint.of(outputs))))


def extend(stack_name: str, hours: float, *, on_event: OnEvent) -> str:
    """Move the lease's end `hours` later (the host's watchdog takes it without a restart). The new end."""
    if hours <= 0:
        raise SessionError("extend by a positive number of hours")
    stack = engine(stack_name)
    if not stack.outputs().get("instance_id"):
        raise SessionError(f"stack {stack_name} is not up: nothing to extend")
    config = stack.config()
    stack.set_config({**config, "hours": str(float(config.get("hours") or 2) + hours)})
    outputs = stack.up(on_event)
    remember(stack_name, outputs)
    return outputs["lease_expires_at"]


def reconfigure(stack_name: str, *, say: Say) -> None:
    """The site playbook again, on the live host, with the stack's settings (what Configure runs)."""
    from . import converge

    outputs_file = stack_dir(stack_name) / "outputs.json"
    if not outputs_file.exists():
        raise SessionError(f"stack {stack_name} is not up: `invoke up --stack {stack_name}` first")
    outputs = json.loads(outputs_file.read_text())
    config = engine(stack_name).config()
    settings = converge.HostSettings(
        stack=stack_name, cloud=outputs["cloud"], instance_id=outputs["instance_id"], host=outputs["host"],
        port=int(outputs["port"]), user=outputs["user"], model=outputs["model"], backend=outputs["backend"],
        quantize=config.get("quantize") == "true", lease_expires_at=outputs["lease_expires_at"],
    )  # fmt: skip
    env = {**os.environ, **({"HF_TOKEN": config["hfToken"]} if config.get("hfToken") else {})}
    converge.site(settings, env)
    say(f"stack {stack_name}: configured")


def lease_left_h(stack: str) -> float | None:
    """Hours until the stack's lease ends (negative: it has ended), or None without one."""
    outputs_file = stack_dir(stack) / "outputs.json"
    expires = json.loads(outputs_file.read_text()).get("lease_expires_at") if outputs_file.exists() else None
    return (datetime.fromisoformat(expires) - datetime.now(UTC)).total_seconds() / 3600 if expires else None


def spend(stack: str) -> str:
    """One line on what the stack's session has cost so far, its rate, its lease and its budget."""
    live = Ledger().sessions(live=True, stack=stack)
    if not live:
        return f"stack {stack} has no running session in the ledger"
    s = live[-1]
    parts = [f"${s.cost:.2f} so far ({s.hours:.2f} h at ${s.price_per_hour:.2f}/h)"]
    left = lease_left_h(stack)
    if left is not None:
        parts.append(f"lease ends in {left:.2f} h (≈ ${max(left, 0) * s.price_per_hour:.2f} more)" if left > 0 else "lease ended")
    if s.budget:
        parts.append(f"budget ${s.budget:.2f}, ${max(s.budget - s.cost, 0):.2f} left")
    return "; ".join(parts)


def status() -> list[dict]:
    """Every session the ledger thinks is running, checked with its cloud, its tunnel and its server."""
    import urllib.request

    found = []
    for s in Ledger().sessions(live=True):
        row = {"stack": s.stack, "cloud": s.cloud, "gpu": s.gpu, "model": s.model, "instance_id": s.instance_id,
               "uptime_h": round(s.hours, 2), "cost_so_far": s.cost, "price_per_hour": s.price_per_hour}  # fmt: skip
        try:
            inst = cloud_client(s.cloud).get(s.instance_id)
            row["cloud_status"] = inst.raw_status if inst.alive else f"gone ({inst.raw_status})"
        except NotFound:
            row["cloud_status"] = "gone"
        except SessionError as e:
            row["cloud_status"] = f"unknown: {e}"
        if row["cloud_status"].startswith("gone"):
            row["drift"] = (
                f"the instance ended outside this tool (lease end or console): `invoke down --stack {s.stack}` tidies up"
            )
        left = lease_left_h(s.stack)
        if left is not None:
            row["lease_left_h"] = round(left, 2)
        row["protections"] = watch.protections(s.stack, s.cloud, s.budget)
        t = tunnel.status(s.stack)
        row["tunnel"] = f"127.0.0.1:{t.port} {'connected' if t.connected else 'reconnecting'}" if t.running else "closed"
        row["server"] = "unknown (no tunnel)"
        if t.connected:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{t.port}/health", timeout=5) as r:
                    row["server"] = "healthy" if r.status == 200 else f"HTTP {r.status}"
            except OSError as e:
                row["server"] = f"not answering: {e}"
        found.append(row)
    return found


def interrupted() -> list[dict]:
    """Stacks that hold resources but no running session in the ledger: an `up` killed or
    interrupted before it finished (the ledger is written when up ends). What may still bill:
    [{"stack", "resources": ["GpuInstance (creating)", …], "drift": what to do}]."""
    live = {s.stack for s in Ledger().sessions(live=True)}
    found = []
    for folder in sorted((state_dir() / "workspaces").glob("*")):
        if folder.name in live or not STACK_NAME.match(folder.name):
            continue
        try:
            rows = engine(folder.name, create=False).resources()
        except StackError:
            continue
        if rows:
            found.append({
                "stack": folder.name,
                "resources": [f"{r['type']}" + (f" ({r['pending']})" if r["pending"] else "") for r in rows],
                "drift": f"up did not finish (killed or interrupted) and may have launched a machine: "
                         f"`invoke down --stack {folder.name}` ends what it made",
            })  # fmt: skip
    return found


def ours(stack: str, cloud: Cloud) -> list[Instance]:
    """The stack's live instances: exactly its name (a prefix would take stack dev-2's for dev's)."""
    return [i for i in cloud.list(instance_name(stack)) if i.alive and i.name == instance_name(stack)]


def instance_name(stack: str) -> str:
    """What infra/__main__.py names the stack's instance."""
    return f"{PREFIX}{stack}-gpu"


def is_ssh_key_of(stack: str, key_name: str) -> bool:
    """Whether a Lambda key is the stack's: infra/__main__.py names it <prefix><stack>-<8 hex of its fingerprint>."""
    return re.fullmatch(re.escape(f"{PREFIX}{stack}-") + "[0-9a-f]{8}", key_name) is not None


def down(stack_name: str, *, say: Say, on_event: OnEvent) -> dict:
    """Scrub and destroy, then prove it: no instance or key of the stack's left at the cloud, the
    stack's local secrets deleted, the session's cost recorded. Works from a shell without the cloud
    keys (the stack holds its own) and for a stack that does not exist (nothing is created: the
    clouds are still asked). A summary."""
    try:
        stack = engine(stack_name, create=False)
    except StackNotFound:
        stack = None
    recorded = stack.resources() if stack else []
    if stack:
        use_stack_keys(stack.config())
    watch.stop(stack_name)
    if tunnel.stop(stack_name):
        say("tunnel closed")
    if stack:
        scrub_half_configured(stack, recorded, say)
        stack.destroy(on_event)
    receipt_file = stack_dir(stack_name) / "scrub-receipt.json"
    receipt = json.loads(receipt_file.read_text()) if receipt_file.exists() else None
    left = verify_gone(stack_name, say)
    remove_orphaned_runs()  # what a killed converge left (its extra vars hold secrets)
    if stack:
        stack.remove()
    shutil.rmtree(stack_dir(stack_name), ignore_errors=True)
    ledger = Ledger()
    closed = [ledger.close(s.instance_id) for s in ledger.sessions(live=True, stack=stack_name)]
    if not recorded and not closed and not left:
        say(f"stack {stack_name}: nothing was up")
    return {
        "stack": stack_name,
        "receipt": receipt,
        "terminated_orphans": left,
        "sessions": [vars(s) | {"cost": s.cost} for s in closed if s],
    }


def use_stack_keys(config: dict[str, str]) -> None:
    """The cloud keys the stack holds (its secret config, set by `up`) for this process's own calls
    to the clouds, where the environment has none."""
    for cloud, key in CONFIG_KEYS.items():
        if config.get(key) and not os.environ.get(KEY_ENV[cloud]):
            os.environ[KEY_ENV[cloud]] = config[key]


def scrub_half_configured(stack, recorded: list[dict], say: Say) -> None:
    """An `up` killed while it configured the host left Configure's create pending (in `recorded`,
    stack.resources() before anything else ran): the state drops it (stack.recover), so `destroy`
    would terminate the host without scrubbing it. Scrub it here
    first, as Configure's delete would have. SessionError when the host answers but the scrub fails."""
    from . import converge

    if not any(r["type"] == "Configure" and r["pending"] == "creating" for r in recorded):
        return
    [host] = [r["outputs"] for r in recorded if r["type"] == "GpuInstance" and not r["pending"]] or [{}]
    if not host.get("host"):
        return
    say(f"up was killed while it configured {host['instance_id']}: scrubbing it before it is destroyed")
    settings = converge.HostSettings(stack=stack.stack, cloud=host["cloud"], instance_id=host["instance_id"],
                                     host=host["host"], port=int(host["port"]), user=host["user"])  # fmt: skip
    try:
        converge.scrub(settings, dict(os.environ))
    except ConfigureError as e:
        raise SessionError(
            f"the scrub of {host['instance_id']} failed: {e}\nNothing was destroyed. Run `invoke down --stack {stack.stack}` "
            f"again, or set {converge.SKIP_SCRUB}=1 to destroy without scrubbing."
        ) from None


def verify_gone(stack_name: str, say: Say) -> list[str]:
    """Ask each cloud we have a key for: anything of this stack's still alive is ended now (and
    named); this stack's Lambda keys are removed."""
    ended = []
    for name in clouds_for("auto"):
        cloud = cloud_client(name)
        for inst in ours(stack_name, cloud):
            say(f"{name} instance {inst.id} ({inst.name}) is still {inst.raw_status}: terminating it")
            cloud.terminate_and_wait(inst.id, time.monotonic() + 300)
            ended.append(inst.id)
        for key in cloud.list_ssh_keys():
            if is_ssh_key_of(stack_name, key.name):
                say(f"{name} SSH key {key.name} is still registered: deleting it")
                try:
                    cloud.delete_ssh_key(key.id)
                except NotFound:
                    pass
    return ended


def orphans() -> list[tuple[str, Instance]]:
    """Live instances named like ours that no stack owns."""
    found = []
    for name in clouds_for("auto"):
        for inst in cloud_client(name).list(PREFIX):
            if not inst.alive or not inst.name.endswith("-gpu"):
                continue
            stack = inst.name.removeprefix(PREFIX).removesuffix("-gpu")
            try:
                owned = engine(stack, create=False).outputs().get("instance_id") == inst.id  # looking creates nothing
            except (StackError, ValueError):
                owned = False
            if not owned:
                found.append((name, inst))
    return found


def sweep(*, confirm: Callable[[str, Instance], bool], say: Say) -> list[str]:
    ended = []
    for name, inst in orphans():
        if confirm(name, inst):
            cloud_client(name).terminate_and_wait(inst.id, time.monotonic() + 300)
            Ledger().close(inst.id)
            ended.append(inst.id)
            say(f"terminated {name} instance {inst.id} ({inst.name})")
    return ended


def available(cloud: str = "auto") -> list[tuple[Offer, list[str]]]:
    """Offers, cheapest first, each with the catalog's models that fit it."""
    offers = [o for c in clouds_for(cloud) for o in cloud_client(c).offers() if not o.spot]
    needs = {}
    for alias, model in sizing.catalog().items():
        try:
            needs[alias] = sizing.model_info(model).need_gb()
        except sizing.SizingError:
            continue  # a model the Hub does not show here is simply not listed
    ranked = sorted(offers, key=lambda o: (o.price_per_hour, o.cloud, o.instance_type))
    return [(o, [a for a, need in needs.items() if need <= o.total_vram_gb]) for o in ranked]
