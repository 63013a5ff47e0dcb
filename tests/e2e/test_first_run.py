"""A new user's first run, as the README's Quick start tells it, typed into an 80-column terminal
(tmux) with no cloud variables exported and no simulator running: `invoke up --sim` draws its
phases (the weights' download with its bytes), `invoke chat` gets tiny-chat's known hello,
`invoke status` is readable and knows the simulator, `invoke down --yes` ends with its summary.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from gpu_session.sim.models import KNOWN_REPLIES, TINY_TEXT

ROOT = Path(__file__).resolve().parents[2]
INVOKE = str(Path(sys.executable).parent / "invoke")
KEEP = ("XDG_", "PULUMI_", "PATH", "HOME", "LANG", "TERM")  # the rest (cloud keys, API bases) stays out


def screen(name: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-J", "-t", name, "-S", "-2000"], capture_output=True, text=True).stdout


def test_the_quick_start_reads_like_a_product_at_80_columns(tmp_path):
    name = "first-run"
    environment = {k: v for k, v in os.environ.items() if k.startswith(KEEP)} | {"GPU_SESSION_SIM_DIR": str(tmp_path / "sim")}
    script = tmp_path / "quick-start.sh"
    script.write_text(
        "\n".join([
            f"cd {ROOT}",
            f"{INVOKE} up --sim --backend transformers --yes; echo UP-EXIT=$?",
            f'{INVOKE} chat --prompt "Say hello"; echo CHAT-EXIT=$?',
            f"{INVOKE} status; echo STATUS-EXIT=$?",
            f"{INVOKE} down --yes; echo DOWN-EXIT=$?",
            "sleep 600",
        ])
    )  # fmt: skip
    exports = " ".join(f"{k}={v}" for k, v in environment.items())
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", name, "-x", "80", "-y", "40", f"env -i {exports} bash {script}"], check=True
    )
    shown = ""
    try:
        deadline = time.monotonic() + 900
        while "DOWN-EXIT=" not in (shown := screen(name)) and time.monotonic() < deadline:
            time.sleep(2)
        exits = dict(re.findall(r"^(UP|CHAT|STATUS|DOWN)-EXIT=(\d+)$", shown, re.M))
        assert exits == {"UP": "0", "CHAT": "0", "STATUS": "0", "DOWN": "0"}, shown
        up, chat, status, down = re.split(r"^(?:UP|CHAT|STATUS)-EXIT=\d+$", shown.split("DOWN-EXIT=")[0], flags=re.M)

        # up: one view of the phases, each with its time; the download with its bytes; no task lines
        for phase in ("✓ plan", "✓ launch", "✓ boot and SSH", "✓ host set-up", "✓ engine install", "✓ weights download",
                      "✓ model load", "✓ ready", "cost so far"):  # fmt: skip
            assert phase in up, up
        [download] = [line for line in up.splitlines() if "✓ weights download" in line]
        assert " of " in download and "B/s" in download, download
        assert "Bootstrap python3" not in up and "ok      " not in up  # Ansible's task lines are in the log, not here
        assert "OpenAI-compatible endpoint: http://127.0.0.1:" in up

        # chat: the simulator's model says its known hello
        assert KNOWN_REPLIES[TINY_TEXT]["Say hello"] in chat, chat

        # status: a block per session (the table does not fit 80 columns), the cloud asked without a key exported
        assert "at the cloud: RUNNING" in status and "protected by" in status, status
        assert "API key" not in status and "unknown" not in status

        # down: the summary for people
        assert "✓ scrub" in down and "✓ terminate" in down and "✓ verify with the cloud" in down, down
        assert "canaries found nowhere" in down and " 0 canaries" not in down, down
        assert "no instance or SSH key of stack dev is left" in down and "stack dev: nothing left at the cloud" in down
        assert "cost: $" in down
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
        info = tmp_path / "sim" / "sim.json"
        if info.exists():
            if "DOWN-EXIT=0" not in shown:  # a step failed: leave nothing running
                subprocess.run([INVOKE, "down", "--yes"], cwd=ROOT, env=environment, capture_output=True, timeout=600)
            os.kill(json.loads(info.read_text())["pid"], signal.SIGTERM)
            deadline = time.monotonic() + 60
            while info.exists() and time.monotonic() < deadline:
                time.sleep(0.5)
