"""The `gpu-session` console script: the same commands as `invoke` in a checkout."""

from __future__ import annotations

import os
import sys

from invoke import Program

from gpu_session import __version__
from gpu_session.cli import tasks
from gpu_session.errors import COMMAND_ENV

program = Program(namespace=tasks.ns, version=__version__, name="gpu-session", binary="gpu-session")


def dotted(argv: list[str]) -> list[str]:
    """`gpu-session cache rm …` as `gpu-session cache.rm …`: a collection's task may be named with a
    space, as the messages write it (Invoke itself takes only the dotted name)."""
    if len(argv) >= 3 and argv[1] in tasks.ns.collections and argv[2] in tasks.ns.collections[argv[1]].tasks:
        return [argv[0], f"{argv[1]}.{argv[2]}", *argv[3:]]
    return argv


def main() -> None:
    os.environ[COMMAND_ENV] = "gpu-session"  # our messages name `gpu-session X`, in child processes too
    program.run(dotted(sys.argv))
