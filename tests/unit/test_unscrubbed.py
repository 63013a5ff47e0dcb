"""A host the scrub cannot reach (dead, or its simulator gone) is destroyed unscrubbed: the
Configure resource's process says so as a progress line, so `down` shows "not scrubbed" on its
scrub phase, never "done" alone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from gpu_session import progress
from gpu_session.paths import ASSETS


def scrub(port: int, **env: str) -> subprocess.CompletedProcess:
    settings = {"STACK": "gone", "CLOUD": "lambda", "INSTANCE_ID": "i-gone", "HOST": "127.0.0.1", "PORT": str(port),
                "USER": "ubuntu"}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "gpu_session.host.converge", "scrub"], cwd=ASSETS, capture_output=True, text=True,
        env={**os.environ, **{f"GPU_SESSION_{k}": v for k, v in settings.items()}, **env}, timeout=120,
    )  # fmt: skip


def test_a_host_that_does_not_answer_is_said_not_scrubbed():
    with socket.socket() as s:  # bound, never listening: the connection is refused
        s.bind(("127.0.0.1", 0))
        for env, why in (({}, "the host did not answer"), ({"GPU_SESSION_SKIP_SCRUB": "1"}, "GPU_SESSION_SKIP_SCRUB=1")):
            done = scrub(s.getsockname()[1], **env)
            said = [found for line in done.stdout.splitlines() if (found := progress.read(line))]
            assert done.returncode == 0 and len(said) == 1, done.stdout + done.stderr
            assert said[0]["phase"] == "scrub" and said[0]["state"] == "done" and why in said[0]["note"], said
            assert said[0]["note"].startswith("not scrubbed")


def test_down_says_not_scrubbed_and_a_providers_failure_in_one_line(tmp_path):
    """The view of `down`: the scrub phase carries the note; a provider's Python traceback is cut to
    its exception (the log keeps all of it)."""
    import io

    from rich.console import Console

    from gpu_session.cli.view import DOWN, SessionView
    from gpu_session.stack.automation import StackEvent

    out = io.StringIO()
    with SessionView(DOWN, tmp_path / "down.log", console=Console(file=out, width=200)) as view:
        view.on_event(StackEvent("start", "delete", "Configure", "configure"))
        note = "not scrubbed: the host did not answer; its disk goes with the instance"
        view.on_event(StackEvent("log", "delete", "Configure", "configure", progress.line("scrub", "done", seconds=0, note=note)))
        view.on_event(StackEvent("done", "delete", "Configure", "configure"))
        view.on_event(StackEvent("start", "delete", "GpuInstance", "gpu"))
        trace = ("Exception calling application: x\nTraceback (most recent call last):\n  File \"/x/pulumi/dynamic/__main__.py\", "
                 "line 1, in delete\ngpu_session.clouds.base.NoSimulator: Lambda API GET /instances: nothing listens at 127.0.0.1:9")  # fmt: skip
        view.on_event(StackEvent("failed", "delete", "GpuInstance", "gpu", trace))
    said = out.getvalue()
    assert f"scrub: done in 0s ({note})" in said, said
    assert "NoSimulator: Lambda API GET /instances: nothing listens at 127.0.0.1:9" in said and "Traceback" not in said, said
    assert "Traceback" in (tmp_path / "down.log").read_text()
