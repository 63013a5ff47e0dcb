"""Bringing a session up, and changing one that is up: `up` (plan, ask, launch with failover on
capacity, record), `extend` (a later lease end), `reconfigure` (the site playbook again)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from datetime import datetime

from gpu_session.clouds import cloud_class
from gpu_session.errors import our_command
from gpu_session.host import converge
from gpu_session.local import record, tunnel
from gpu_session.local.ledger import Entry, Ledger
from gpu_session.providers import configure
from gpu_session.stack.automation import (
    NoCapacity,
    OnEvent,
    PulumiEngine,
    StackCancelled,
    StackError,
    StackNotFound,
    engine,
)
from gpu_session.stack.config import StackConfig

from . import watch
from .plan import Plan, Say, SessionError, UpOptions, prepare, stack_settings, use_session


def is_up(stack: str, engine_stack: PulumiEngine | None = None) -> bool:
    """Whether `stack` has an instance (its plain output instance_id: nothing to decrypt), which up
    refuses to launch over; `engine_stack` when the caller has it. Creates no stack."""
    if engine_stack is None:
        try:
            engine_stack = engine(stack, create=False)
        except StackNotFound:
            return False
    return bool(engine_stack.outputs(secrets=False).get("instance_id"))


def up(opts: UpOptions, *, confirm: Callable[[Plan], bool], say: Say, on_event: OnEvent) -> dict:
    """Plan, ask, bring the stack up (failing over on capacity), record it. The outputs, or {} if declined."""
    stack = engine(opts.stack)
    if is_up(opts.stack, stack):
        raise SessionError(
            f"stack {opts.stack} is already up: {our_command(f'chat --stack {opts.stack}')}, or {our_command(f'down --stack {opts.stack}')}"
        )
    opts, candidates = prepare(opts)
    if not confirm(candidates[0]):
        return {}
    record.remember_environment(opts.stack, dict(os.environ))  # a failed or killed up: down still finds the cloud
    for n, plan in enumerate(candidates):
        stack.set_config(stack_settings(opts, plan))
        try:
            outputs = stack.up(on_event)
        except NoCapacity:
            if n + 1 == len(candidates):
                raise
            where = f"{plan.offer.gpu_name} in {plan.region or 'any region'} on {plan.offer.cloud}"
            say(f"no capacity: {where}; trying {candidates[n + 1].describe()}")
            continue
        except StackError as e:
            if not isinstance(e, StackCancelled) and any(r["type"] == "GpuInstance" for r in stack.resources()):
                raise SessionError(
                    f"{e}\nA machine of stack {opts.stack} is still up and bills (${plan.offer.price_per_hour:.2f}/h): "
                    f"{our_command(f'down --stack {opts.stack}')} scrubs and ends it."
                ) from None
            raise
        launched = outputs.get("launched_at")
        started = datetime.fromisoformat(launched).timestamp() if launched else time.time()  # billed from launch
        Ledger().open(Entry(opts.stack, outputs["cloud"], outputs["instance_id"], outputs.get("gpu") or plan.offer.gpu_name,
                              opts.model, float(outputs["price_per_hour"]), started, budget=opts.budget))  # fmt: skip
        record.save(opts.stack, outputs, dict(os.environ))
        if opts.budget is not None or not cloud_class(outputs["cloud"]).host_ends_itself:
            watch.start(opts.stack)  # the budget, and the lease end where the host cannot end itself
        if opts.configure:
            outputs = {**outputs, "tunnel_port": tunnel.start(opts.stack).port}
        return outputs
    raise SessionError("no offer could be launched")  # not reached: the last failure is raised above


def extend(stack_name: str, hours: float, *, on_event: OnEvent) -> str:
    """Move the lease's end `hours` later (the host's watchdog takes it without a restart). The new end."""
    if hours <= 0:
        raise SessionError("extend by a positive number of hours")
    use_session(stack_name)
    stack = engine(stack_name)
    if not stack.outputs(secrets=False).get("instance_id"):
        raise SessionError(f"stack {stack_name} is not up: nothing to extend")
    config = stack.config()
    stack.set_config({**config, "hours": str(float(config.get("hours") or StackConfig.hours) + hours)})
    outputs = stack.up(on_event)
    record.save(stack_name, outputs, dict(os.environ))
    return outputs["lease_expires_at"]


def reconfigure(stack_name: str, *, say: Say) -> None:
    """The site playbook again, on the live host, with what the stack's Configure ran with (its
    inputs in the state: the planned context, the cache volume, the HF token), and the lease's end
    as the session's record has it (`extend` moves it). SessionError when the stack has no
    configured host."""
    live = record.load(stack_name)
    stack = engine(stack_name)
    use_session(stack_name, stack.config())
    inputs = next((r["outputs"] for r in stack.resources() if r["type"] == "Configure" and not r["pending"]), None)
    if not inputs:
        raise SessionError(
            f"stack {stack_name} has no configured host (up with --no-configure?): {our_command('up')} configures one"
        )
    env = configure.environment(inputs)
    settings = converge.HostSettings.from_env(env)
    if live.lease_expires_at:  # `extend` moved it (its up updates the state too, when it got that far)
        settings = dataclasses.replace(settings, lease_expires_at=live.lease_expires_at.isoformat(timespec="seconds"))
    converge.site(settings, env)
    say(f"stack {stack_name}: configured")
