"""The watch: a background helper (`python -m gpu_session.watch`) that guards the bill while the
session is up, from this machine.

- Budget: at 80 % of the session's budget it warns (in its log); at 100 % it
  scrubs and destroys the session, as `invoke down` does.
- Lease: where the host cannot end itself at the lease's end (Lambda without an uploaded key: the
  host only wipes itself), the watch destroys it then, while this machine is on.

`up` starts it, `down` stops it; `invoke status` says which protection is active.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime

from . import daemon
from .ledger import Ledger
from .paths import stack_dir

NAME = "watch"
WARN_AT = 0.8
INTERVAL_S = float(os.environ.get("GPU_SESSION_WATCH_INTERVAL", "30"))


def start(stack: str) -> None:
    if not daemon.running(stack, NAME):
        daemon.spawn(stack, NAME, "gpu_session.watch", "--stack", stack)


def stop(stack: str) -> bool:
    return daemon.stop(stack, NAME)


def protections(stack: str, cloud: str, budget: float | None) -> list[str]:
    """What guards this session's bill, in words."""
    found = [
        "the host's lease watchdog: "
        + ("it ends the pod at the lease's end" if cloud == "runpod" else "it wipes the host at the lease's end")
    ]
    if daemon.running(stack, NAME):
        if cloud == "lambda":
            found.append("this machine's watch: it destroys the instance at the lease's end while this machine is on")
        if budget:
            found.append(f"this machine's watch: budget ${budget:g} (warns at 80 %, destroys at 100 %)")
    return found


def lease_end(stack: str) -> float | None:
    path = stack_dir(stack) / "outputs.json"
    expires = json.loads(path.read_text()).get("lease_expires_at") if path.exists() else None
    return datetime.fromisoformat(expires).timestamp() if expires else None


def check(stack: str, say) -> str | None:
    """One look. The reason to end the session now, if any."""
    session = next(iter(Ledger().sessions(live=True, stack=stack)), None)
    if session is None:
        return "gone"
    if session.budget:
        share = session.cost / session.budget
        if share >= 1:
            return f"the budget is spent: ${session.cost:.4f} of ${session.budget:g}"
        if share >= WARN_AT and not daemon.state(stack, NAME).get("warned"):
            say(f"warning: {share:.0%} of the ${session.budget:g} budget is spent; the session ends at 100 %")
            daemon.update(stack, NAME, warned=True)
    end = lease_end(stack)
    if session.cloud == "lambda" and end and time.time() >= end:
        return "the lease has ended"
    return None


def watch(stack: str) -> None:
    from . import session
    from .stack import StackEvent

    def say(text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)

    def on_event(event: StackEvent) -> None:
        if event.kind in ("done", "failed") or event.message:
            say(f"{event.kind} {event.op} {event.type} {event.name} {event.message}".strip())

    say(f"watching stack {stack}")
    while True:
        reason = check(stack, say)
        if reason == "gone":
            say("the session has ended")
            return
        if reason:
            say(f"{reason}: scrubbing and destroying the session")
            session.down(stack, say=say, on_event=on_event)
            say("destroyed")
            return
        time.sleep(INTERVAL_S)


def main() -> None:
    parser = argparse.ArgumentParser(description="Guard a session's budget and lease (started by `invoke up`)")
    parser.add_argument("--stack", required=True)
    watch(parser.parse_args().stack)


if __name__ == "__main__":
    main()
