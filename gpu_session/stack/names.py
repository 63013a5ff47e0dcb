"""What the programs name the things their stacks create, so that `down` and `sweep` find them at
the cloud by name. The session project (infra/__main__.py): <project>-<stack>-gpu for the instance
and <project>-<stack>-<8 hex of the key's SHA-256> for a Lambda SSH key. The cache project
(infra/cache/): one stack per cloud and region, <cloud>-<region> lowercased, whose volume is
gpu-session-cache-<region> lowercased. Imports paths only."""

from __future__ import annotations

import hashlib
import re

from gpu_session.paths import STACK_NAME

PROJECT = "gpu-session"  # Pulumi.yaml's name
PREFIX = f"{PROJECT}-"
CACHE_PROJECT = "gpu-session-cache"  # infra/cache/Pulumi.yaml's name
VOLUME_PREFIX = f"{CACHE_PROJECT}-"
# A region as the clouds spell them: Lambda's us-east-1, RunPod's data center EU-RO-1.
REGION = re.compile(r"^[A-Za-z]{2,}(-[A-Za-z0-9]+)*-[0-9]+$")


def cache_stack(cloud: str, region: str) -> str:
    """The cache project's stack for a cloud and region: lambda-us-east-1, runpod-eu-ro-1."""
    return f"{cloud}-{region.lower()}"


def volume_name(region: str) -> str:
    """The cache volume's name at the cloud: gpu-session-cache-us-east-1 (lowercased: a Lambda
    filesystem name takes letters, digits and '-'; RunPod takes it as it is). One per region: a
    region belongs to one cloud, and each cloud's account holds its own names."""
    return f"{VOLUME_PREFIX}{region.lower()}"


def volume_is_ours(name: str) -> bool:
    """Whether a volume's name is one volume_name gives (sweep's test for a cache of ours)."""
    rest = name.removeprefix(VOLUME_PREFIX)
    return name.startswith(VOLUME_PREFIX) and rest == rest.lower() and REGION.match(rest) is not None


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
