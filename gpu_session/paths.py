"""Where gpu-session keeps its state on the controller (XDG_STATE_HOME, default ~/.local/state)."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gpu-session"
