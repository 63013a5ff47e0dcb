"""Ending sessions and proving it: `down` (scrub, destroy, then ask the cloud), and `sweep` (what
is ours at a cloud but no stack owns).

Money first: `down` does not trust the stack's word that the machine is gone but asks the cloud,
and ends anything of the stack's that is still there, and says which cache volumes remain and what
they bill a month (a session's destroy never touches them: they are stacks of their own project);
`sweep` finds instances of ours that no stack owns, and volumes named like our caches that no cache
stack owns."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable

from gpu_session.clouds import API_KEY_ENV, Cloud, CloudError, Instance, NotFound, Volume
from gpu_session.errors import GpuSessionError, our_command
from gpu_session.host import converge
from gpu_session.host.ansible import ConfigureError, remove_orphaned_runs
from gpu_session.local import tunnel
from gpu_session.local.ledger import Ledger
from gpu_session.paths import private_dir, stack_dir, state_dir, write_private
from gpu_session.stack import names
from gpu_session.stack.automation import OnEvent, StackError, StackNotFound, engine

from . import cache, watch
from .plan import Say, SessionError, cloud_client, clouds_for, use_session


def ours(stack: str, cloud: Cloud) -> list[Instance]:
    """The stack's live instances: exactly its name (a prefix would take stack dev-2's for dev's)."""
    return [i for i in cloud.list(names.instance_name(stack)) if i.alive and i.name == names.instance_name(stack)]


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
    use_session(stack_name, stack.config() if stack else {})
    if tunnel.stop(stack_name):
        say("tunnel closed")
    if stack:
        scrub_half_configured(stack, recorded, say)
        stack.destroy(on_event)
    watch.stop(stack_name)  # only now: while a destroy fails, the watch still guards the bill
    receipt_file = stack_dir(stack_name) / converge.RECEIPT
    receipt, kept = None, None
    if receipt_file.exists():  # kept after the stack's folder goes: the proof of the scrub
        receipt = json.loads(receipt_file.read_text())
        kept = write_private(
            private_dir(state_dir() / "receipts") / f"{stack_name}-{receipt['instance_id']}.json", receipt_file.read_text()
        )
    if not stack and not any(os.environ.get(var) for var in API_KEY_ENV.values()):
        # Nothing of the stack here, and no key to ask a cloud with: say so rather than fail.
        asked, left = [], []
    else:
        asked = clouds_for("auto")
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
        "receipt": receipt,  # the scrub's, as the host reported it; None when nothing was scrubbed
        "receipt_file": str(kept) if kept else None,
        "clouds_asked": asked,  # each said: no instance or key of the stack's is left (after ending what was)
        "terminated_orphans": left,
        "sessions": [vars(s) | {"cost": s.cost, "hours": s.hours} for s in closed if s],
        "caches": remaining_caches(say),  # what still bills a month after this session: the cache volumes kept
    }


def remaining_caches(say: Say) -> list[dict]:
    """The cache volumes of this machine that remain, as cache.CacheInfo.as_json gives them. Never
    fails `down`: a cloud that does not answer is noted on its cache, and any other failure is said."""
    try:
        return [c.as_json() for c in cache.caches()]
    except (GpuSessionError, OSError) as e:
        say(f"could not list the cache volumes that remain: {e} ({our_command('cache list')})")
        return []


def scrub_half_configured(stack, recorded: list[dict], say: Say) -> None:
    """An `up` killed while it configured the host left Configure's create pending (in `recorded`,
    stack.resources() before anything else ran): the state drops it (stack.recover), so `destroy`
    would terminate the host without scrubbing it. Scrub it here
    first, as Configure's delete would have. SessionError when the host answers but the scrub fails."""

    if not any(r["type"] == "Configure" and r["pending"] == "creating" for r in recorded):
        return
    [host] = [r["outputs"] for r in recorded if r["type"] == "GpuInstance" and not r["pending"]] or [{}]
    if not host.get("host"):
        return
    say(f"up was killed while it configured {host['instance_id']}: scrubbing it before it is destroyed")
    settings = converge.HostSettings(stack=stack.stack, cloud=host["cloud"], instance_id=host["instance_id"],
                                     host=host["host"], port=int(host["port"]), user=host["user"])  # fmt: skip
    try:
        converge.scrub(settings, dict(os.environ), tell=say)
    except ConfigureError as e:
        raise SessionError(
            f"the scrub of {host['instance_id']} failed: {e}\nNothing was destroyed. Run {our_command(f'down --stack {stack.stack}')} "
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
        for key in cloud.list_ssh_keys() if cloud.registers_ssh_keys else []:
            if names.is_ssh_key_of(stack_name, key.name):
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
        for inst in cloud_client(name).list(names.PREFIX):
            stack = names.stack_of_instance(inst.name)
            if not inst.alive or stack is None:
                continue
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


def sweep_volumes(*, confirm: Callable[[str, Volume], bool], say: Say) -> list[str]:
    """Volumes named like our caches (names.volume_is_ours) that no cache stack here owns: each
    deleted on `confirm`; one an instance has attached is refused (said, and left). Raises
    cache.CacheError when a cache stack cannot be read (then no volume can be called an orphan)."""
    try:
        clouds = clouds_for("auto")
    except SessionError:
        return []
    deleted = []
    for name, volume in cache.orphan_volumes(clouds):
        if volume.in_use:
            say(f"{name} volume {volume.name} ({volume.id}) is named like a cache of ours but attached to a running "
                "instance: not deleted (end that instance first)")  # fmt: skip
            continue
        if not confirm(name, volume):
            continue
        try:
            cache.delete_orphan(name, volume)
        except (cache.CacheError, CloudError) as e:
            say(str(e))
            continue
        deleted.append(volume.id)
        say(f"deleted {name} volume {volume.name} ({volume.id})")
    return deleted
