"""What the program (infra/__main__.py) names the things a stack creates, so that `down` and
`sweep` find them at the cloud by name: <project>-<stack>-gpu for the instance and
<project>-<stack>-<8 hex of the key's SHA-256> for a Lambda SSH key. Imports paths only."""

from __future__ import annotations

import hashlib
import re

from gpu_session.paths import STACK_NAME

PROJECT = "gpu-session"  # Pulumi.yaml's name
PREFIX = f"{PROJECT}-"


def instance_name(stack: str) -> str:
    """The stack's instance: exactly this name (a prefix would take stack dev-2's for dev's)."""
    return f"{PREFIX}{stack}-gpu"


def ssh_key_name(stack: str, public_key: str) -> str:
    """The stack's registered SSH key: its name changes with the key, so a new key never clashes."""
    return f"{PREFIX}{stack}-{hashlib.sha256(public_key.encode()).hexdigest()[:8]}"


def is_ssh_key_of(stack: str, key_name: str) -> bool:
    """Whether a registered key's name is one ssh_key_name gives the stack."""
    return re.fullmatch(re.escape(f"{PREFIX}{stack}-") + "[0-9a-f]{8}", key_name) is not None


def stack_of_instance(name: str) -> str | None:
    """The stack an instance of ours belongs to, from its name; None for a name not ours."""
    if not name.startswith(PREFIX) or not name.endswith("-gpu"):
        return None
    stack = name.removeprefix(PREFIX).removesuffix("-gpu")
    return stack if STACK_NAME.match(stack) else None  # "..", "a/b": never a stack of ours, never a path
