"""Applies injected faults around an API handler; each API supplies its own error bodies."""

from __future__ import annotations

import time
from collections.abc import Callable

from .http import Drop, Handler, Request, Response
from .world import World


def with_faults(
    world: World,
    api: str,
    op: str,
    handler: Handler,
    error: Callable[[int], Response],
    capacity: Callable[[], Response],
    after_create: Callable[[], Response] | None = None,
) -> Handler:
    """`after_create` is the API's answer for error_after_create (default: its 500)."""

    def wrapped(req: Request) -> Response:
        fault = world.take_fault(api, op)
        if fault is None:
            return handler(req)
        kind = fault.kind
        if kind.isdigit():
            return error(int(kind))
        if kind == "capacity":
            return capacity()
        if kind == "slow":
            time.sleep(fault.delay)
            return handler(req)
        resp = handler(req)  # the remaining kinds do the work first
        if kind == "timeout":
            time.sleep(fault.delay)
            return resp
        if kind == "error_after_create":
            return after_create() if after_create else error(500)
        raise Drop  # "drop"

    return wrapped
