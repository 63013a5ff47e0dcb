"""Configure: the model server on the stack's instance, as a resource of the stack.

create and update run `python -m gpu_session.host.converge site` (playbooks/site.yml: the roles, whose
own digest skips what is unchanged); delete runs `... scrub` while the host is still alive, as
Configure depends on the instance and Pulumi deletes dependents first. The inputs reach the command
as its environment (GPU_SESSION_*, and the HF token as HF_TOKEN), never as arguments; the token is a
secret input and output, so the state holds it encrypted.

A new instance replaces this resource (delete first: scrub the old host, then configure the new).
Each line the command prints goes to this provider's output, which the engine shows as the
stack's diagnostics (`pulumi up`) and `invoke up` as progress lines. The command runs in a session
of its own, so the first Ctrl-C lets the playbook finish; a killed engine ends it (lifetime.py).

This is our own dynamic provider rather than pulumi-command's `local.Command` because the command
plugin cannot be built from the modules our machines reach, and dynamic providers need no plugin
at all (../shared/research/pulumi.md, "Building the engine from Go modules").
"""

from __future__ import annotations

import os
import subprocess
import sys

import pulumi
from pulumi.dynamic import (
    CheckFailure,
    CheckResult,
    CreateResult,
    DiffResult,
    ReadResult,
    Resource,
    ResourceProvider,
    UpdateResult,
)

from gpu_session.paths import ASSETS

from .lifetime import end_with_engine

# Inputs that become GPU_SESSION_<NAME> in the command's environment.
SETTINGS = (
    "stack",
    "cloud",
    "instance_id",
    "host",
    "port",
    "user",
    "model",
    "backend",
    "quantize",
    "device",
    "context",
    "trust_remote_code",
    "lease_expires_at",
    "roles_digest",
    "cache_root",  # where the host sees the cache volume ("": none), its size in GB (0: grows), and
    "cache_size_gb",  # whether the weights may go on it (not a gated or private model's, unless the user said so)
    "cache_weights",
)
REQUIRED = ("stack", "cloud", "instance_id", "host", "port", "user")
SECRET = "hf_token"


class ConfigureFailed(Exception):
    """The playbook failed: the command's last lines say where."""


def environment(props: dict) -> dict[str, str]:
    """The command's environment: this process's (the simulator's endpoints, the user's HF_ENDPOINT)
    with the inputs on top."""
    env = {**os.environ, **{f"GPU_SESSION_{k.upper()}": str(props.get(k) or "") for k in SETTINGS}}
    env.pop("HF_TOKEN", None)
    if props.get(SECRET):
        env["HF_TOKEN"] = props[SECRET]
    return env


def converge(action: str, props: dict) -> None:
    """Run `python -m gpu_session.host.converge ACTION`, logging each line it prints; ConfigureFailed
    with its last lines when it fails."""
    # A session of its own: the first Ctrl-C, which reaches the engine's whole process group, must
    # let the playbook finish (the engine records it), not abort it half-way.
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpu_session.host.converge", action],
        cwd=ASSETS, env=environment(props), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, errors="replace", start_new_session=True,
    )  # fmt: skip
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        print(line, flush=True)  # the engine's log of this provider, and `pulumi up -v`
        tail = [*tail[-9:], line]
    if proc.wait() != 0:
        raise ConfigureFailed(f"converge {action} failed (exit {proc.returncode}):\n" + "\n".join(tail))


class ConfigureProvider(ResourceProvider):
    def configure(self, req) -> None:
        end_with_engine()

    def check(self, olds, news):
        failures = [CheckFailure(k, f"{k} is needed to reach the host") for k in REQUIRED if not news.get(k)]
        return CheckResult(news, failures)

    def diff(self, id_, olds, news):
        changed = [k for k in (*SETTINGS, SECRET) if olds.get(k) != news.get(k)]
        # Another machine: scrub the old one before the new one is configured.
        replaces = [k for k in ("instance_id", "cloud") if k in changed]
        return DiffResult(changes=bool(changed), replaces=replaces, delete_before_replace=True)

    def create(self, props):
        try:
            converge("site", props)
        except ConfigureFailed:
            # A failed create leaves no Configure in the state, so no delete would ever scrub this
            # host (which may hold the HF token, the server's key, part of the weights): now.
            try:
                converge("scrub", props)
            except ConfigureFailed as e:
                print(f"the scrub after the failed configure failed too: {e}", flush=True)
            raise
        return CreateResult(str(props["instance_id"]), dict(props))

    def update(self, id_, olds, news):
        converge("site", news)
        return UpdateResult(dict(news))

    def read(self, id_, props):
        return ReadResult(id_, props)  # what a host is configured with is the playbook's to check, on update

    def delete(self, id_, props):
        converge("scrub", props)


class Configure(Resource, module="gpu_session", name="Configure"):
    def __init__(self, resource_name: str, *, opts: pulumi.ResourceOptions | None = None, hf_token=None, **settings):
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise TypeError(f"Configure has no input {', '.join(sorted(unknown))}")
        opts = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(additional_secret_outputs=[SECRET]))
        super().__init__(ConfigureProvider(), resource_name, {**dict.fromkeys(SETTINGS), **settings, SECRET: hf_token}, opts)
