"""How the parts that run inside the engine (the providers, converge) tell the face how far a
session has come: one line on their output, `progress {JSON}`, which reaches the face as a stack
log event (gpu_session.cli.view draws it). Imports nothing of ours.

    {"phase": "download", "state": "start" | "done" | "running", "seconds": …, "bytes": …, "total": …,
     "note": "reused from the cache volume"}
"""

from __future__ import annotations

import json

PREFIX = "progress "


def line(phase: str, state: str, **facts) -> str:
    """The line to print for `phase` reaching `state` (start, running, done), with facts (numbers, text)."""
    return PREFIX + json.dumps({"phase": phase, "state": state, **facts})


def read(message: str) -> dict | None:
    """The progress a printed line carries, or None for any other line."""
    if not message.startswith(PREFIX):
        return None
    try:
        found = json.loads(message[len(PREFIX) :])
    except ValueError:
        return None
    return found if isinstance(found, dict) and "phase" in found and "state" in found else None
