"""The one base of the errors a person can act on, and how their messages name our commands.

Every typed error of ours derives from GpuSessionError and its message says what went wrong and
what to do; the face (gpu_session.cli) prints it as one line and exits 1. Anything else reaching the
face is a bug, and keeps its traceback. Imports nothing of ours.
"""

import os
import re

# Set by the installed `gpu-session` script (gpu_session.cli.main) for itself and its children (the
# Pulumi program, the providers, the watch, a background simulator): messages then name
# `gpu-session X`; unset, in a checkout, `invoke X` (the README: the same commands).
COMMAND_ENV = "GPU_SESSION_COMMAND"
# Our Invoke collections: `invoke cache.rm` in a checkout is `gpu-session cache rm` installed
# (gpu_session.cli.tasks.ns's collections; tests/unit/test_face.py keeps the two the same).
COLLECTIONS = ("cache", "history", "tunnel")
# Set by `--sim` (gpu_session.cli.tasks._simulate) for this process and its children: a hint then
# names the commands that take --sim with it, so that the person's next command rehearses too.
SIM_ENV = "GPU_SESSION_SIM"
SIM_COMMANDS = ("up", "down", "doctor", "sweep", "cache")


def our_command(args: str, quoted: bool = True) -> str:
    """`args` (a command as the installed script takes it: "cache rm --cloud lambda") as the person
    runs our commands, in backquotes unless not `quoted`: "`gpu-session cache rm --cloud lambda`"
    where they ran the installed script, "`invoke cache.rm --cloud lambda`" in a checkout; with
    " --sim" after one of SIM_COMMANDS when this is a rehearsal (SIM_ENV)."""
    program = os.environ.get(COMMAND_ENV) or "invoke"
    words = args.split()
    if os.environ.get(SIM_ENV) == "1" and words[0] in SIM_COMMANDS and "--sim" not in words:
        words.append("--sim")
    if program == "invoke" and len(words) >= 2 and words[0] in COLLECTIONS:
        words[:2] = [f"{words[0]}.{words[1]}"]
    args = " ".join(words)
    return f"`{program} {args}`" if quoted else f"{program} {args}"


def in_our_words(text: str) -> str:
    """`text` from the roles (which name the installed script, "`gpu-session cache rm`", since a
    person running them by hand has it) with each such command as this person runs ours (our_command)."""
    return re.sub(r"`gpu-session ([^`]+)`", lambda m: our_command(m.group(1)), text)


class GpuSessionError(Exception):
    """What went wrong, and what to do (one line). `summary`: what a command had done before it
    failed ({"terminated": [...]}), for its `--json` summary line."""

    summary: dict = {}
