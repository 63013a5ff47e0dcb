"""What is running and what it costs: `status` (each live session, asked of its cloud, its tunnel
and its server), the stacks an interrupted `up` left holding resources, and the offers to choose from."""

from __future__ import annotations

from gpu_session import sizing
from gpu_session.clouds import CloudError, NotFound, Offer
from gpu_session.errors import our_command
from gpu_session.local import record, tunnel
from gpu_session.local.ledger import Ledger
from gpu_session.paths import STACK_NAME, state_dir
from gpu_session.stack.automation import StackError, engine

from . import watch
from .plan import SessionError, cloud_client, clouds_for, in_session


def status() -> list[dict]:
    """Every session the ledger thinks is running, checked with its cloud, its tunnel and its server."""
    import urllib.request

    found = []
    for s in Ledger().sessions(live=True):
        with in_session(s.stack):  # from any shell: where its cloud is, and its key
            row = {"stack": s.stack, "cloud": s.cloud, "gpu": s.gpu, "model": s.model, "instance_id": s.instance_id,
                   "uptime_h": round(s.hours, 2), "cost_so_far": s.cost, "price_per_hour": s.price_per_hour}  # fmt: skip
            try:
                inst = cloud_client(s.cloud).get(s.instance_id)
                row["cloud_status"] = inst.raw_status if inst.alive else f"gone ({inst.raw_status})"
            except NotFound:
                row["cloud_status"] = "gone"
            except (SessionError, CloudError) as e:  # no key, or the cloud does not answer: the rest still shows
                row["cloud_status"] = f"unknown: {e}"
            if row["cloud_status"].startswith("gone"):
                row["drift"] = (
                    f"the instance ended outside this tool (lease end or console): {our_command(f'down --stack {s.stack}')} tidies up"
                )
            live = record.find(s.stack)
            left = live.lease_left_h() if live else None
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
                "drift": f"up did not finish (it failed, or was killed or interrupted) and may have launched a machine: "
                         f"{our_command(f'down --stack {folder.name}')} ends what it made",
            })  # fmt: skip
    return found


def available(cloud: str = "auto") -> list[tuple[Offer, list[str]]]:
    """Offers a session can run on (sizing.usable), cheapest first, each with the catalog's models
    that fit it at their default context (the rule `up` plans with)."""
    offers = [o for c in clouds_for(cloud) for o in cloud_client(c).offers() if sizing.usable(o)]
    needs = {}
    for alias, model in sizing.catalog().items():
        try:
            needs[alias] = sizing.model_info(model).need_bytes()
        except sizing.SizingError:
            continue  # a model the Hub does not show here is simply not listed
    ranked = sorted(offers, key=lambda o: (o.price_per_hour, o.cloud, o.instance_type))
    return [(o, [a for a, need in needs.items() if sizing.fitting([o], need, with_capacity=False)]) for o in ranked]
