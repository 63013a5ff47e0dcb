"""The commands, as Invoke tasks: `invoke NAME` in a checkout, `gpu-session NAME` once installed.

Tasks stay thin: each parses its options and calls into the package.
"""

from __future__ import annotations

import shlex
import sys

from invoke import Collection, task


@task(
    help={
        "args": "extra pytest arguments, e.g. '-k lambda -x'",
        "fast": "only the tests that need no simulator hosts (unit tests)",
    }
)
def test(c, args="", fast=False):
    """Run the test suite (what CI runs)."""
    target = "tests/unit" if fast else ""
    c.run(f"{shlex.quote(sys.executable)} -m pytest {target} {args}".strip(), pty=False)


@task(
    help={
        "port": "API port (default: a free one)",
        "boot_delay": "seconds from launch until a host starts (default 3)",
        "no_rate_limits": "turn off Lambda's documented rate limits",
        "loopback": "sshd on loopback ports instead of isolated network-namespace hosts",
        "env": 'print the running simulator\'s export lines and exit: eval "$(invoke sim --env)"',
        "list": "print the running simulator's instances, keys and faults",
        "json": "with --list: JSON",
        "cleanup": "remove what a simulator that died left behind",
        "fault": "inject a fault, API:OP:KIND[:TIMES] (repeatable)",
        "capacity": "instances a type can hold per region, CLOUD:TYPE[:REGION]=N (repeatable)",
    },
    iterable=["fault", "capacity"],
)
def sim(
    c,
    port=0,
    boot_delay=3.0,
    no_rate_limits=False,
    loopback=False,
    env=False,
    list=False,
    json=False,
    cleanup=False,
    fault=None,
    capacity=None,
):
    """Run the cloud simulator in the foreground; it prints `export` lines that point clients at it."""
    from gpu_session.sim.__main__ import main

    argv = ["--port", str(port), "--boot-delay", str(boot_delay)]
    argv += ["--no-rate-limits"] * no_rate_limits + ["--loopback"] * loopback + ["--env"] * env + ["--list"] * list
    argv += ["--json"] * json + ["--cleanup"] * cleanup
    for f in fault or []:
        argv += ["--fault", f]
    for cap in capacity or []:
        argv += ["--capacity", cap]
    sys.exit(main(argv))


@task(
    help={
        "lock": "re-resolve the engines' lock files from PyPI first (after changing a pin in gpu_session/engines.py)",
        "dest": "where the wheelhouse goes (default: $GPU_SESSION_WHEELHOUSE or /var/cache/gpu-session/wheels)",
    }
)
def engines(c, lock=False, dest=""):
    """Build the wheelhouse the model server installs from on hosts without internet (the simulator's)."""
    from pathlib import Path

    from gpu_session import engines as pinned

    if lock:
        for engine in pinned.ENGINES:
            print(f"locked {engine}: {pinned.lock(engine)}")
    print(f"wheelhouse ready: {pinned.build_wheelhouse(Path(dest) if dest else None)}")


ns = Collection.from_module(sys.modules[__name__])
