"""The `gpu-session` console script: the same commands as `invoke` in a checkout."""

from __future__ import annotations

from invoke import Program

from gpu_session import __version__
from gpu_session.cli import tasks

program = Program(namespace=tasks.ns, version=__version__, name="gpu-session", binary="gpu-session")


def main() -> None:
    program.run()
