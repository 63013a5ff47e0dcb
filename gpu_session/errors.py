"""The one base of the errors a person can act on.

Every typed error of ours derives from GpuSessionError and its message says what went wrong and
what to do; the face (gpu_session.cli) prints it as one line and exits 1. Anything else reaching the
face is a bug, and keeps its traceback. Imports nothing.
"""


class GpuSessionError(Exception):
    """What went wrong, and what to do (one line). `summary`: what a command had done before it
    failed ({"terminated": [...]}), for its `--json` summary line."""

    summary: dict = {}
