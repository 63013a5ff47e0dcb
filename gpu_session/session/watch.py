"""The watch: a background helper that guards the bill while the session is up, from this machine.

- Budget: at 80 % of the session's budget it warns (in its log); at 100 % it
  scrubs and destroys the session, as `invoke down` does.
- Lease: where the host cannot end itself at the lease's end (Cloud.host_ends_itself: a Lambda
  instance only wipes itself), the watch destroys it then, while this machine is on.

`up` starts it, `down` stops it; `invoke status` says which protection is active. Its process is
`python -m gpu_session.cli.watch`: the face, which joins this loop to `down` (this module cannot
import down, which stops the watch).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from gpu_session.clouds import cloud_class
from gpu_session.local import daemon, record
from gpu_session.local.ledger import Ledger

NAME = "watch"
PROCESS = "gpu_session.cli.watch"
WARN_AT = 0.8
INTERVAL_S = float(os.environ.get("GPU_SESSION_WATCH_INTERVAL", "30"))


def start(stack: str) -> None:
    if not daemon.running(stack, NAME):
        daemon.spawn(stack, NAME, PROCESS, "--stack", stack)


def stop(stack: str) -> bool:
    return daemon.stop(stack, NAME)


def protections(stack: str, cloud: str, budget: float | None) -> list[str]:
    """What guards this session's bill, in words."""
    ends_itself = cloud_class(cloud).host_ends_itself
    found = [
        "the host's lease watchdog: "
        + ("it ends the host at the lease's end" if ends_itself else "it wipes the host at the lease's end")
    ]
    if daemon.running(stack, NAME):
        if not ends_itself:
            found.append("this machine's watch: it destroys the instance at the lease's end while this machine is on")
        if budget:
            found.append(f"this machine's watch: budget ${budget:g} (warns at 80 %, destroys at 100 %)")
    return found


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
    live = record.find(stack)
    left = live.lease_left_h() if live else None
    if not cloud_class(session.cloud).host_ends_itself and left is not None and left <= 0:
        return "the lease has ended"
    return None


def guard(stack: str, end: Callable[[str], None], say: Callable[[str], None]) -> None:
    """Look every INTERVAL_S until the session is gone, or `end` it (scrub and destroy) when
    check() gives a reason."""
    say(f"watching stack {stack}")
    while True:
        reason = check(stack, say)
        if reason == "gone":
            say("the session has ended")
            return
        if reason:
            say(f"{reason}: scrubbing and destroying the session")
            try:
                end(stack)
            except Exception as e:  # noqa: BLE001 (a locked stack, a cloud's bad minute: the bill still runs, so try again)
                say(f"could not end the session ({type(e).__name__}: {e}); trying again in {INTERVAL_S:g} s")
                time.sleep(INTERVAL_S)
                continue
            say("destroyed")
            return
        time.sleep(INTERVAL_S)
