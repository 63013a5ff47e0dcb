"""What `up` and `down` show while they work.

On a terminal, one live view of the session's phases: each with a spinner while it runs and its
time when done, the weights' download with bytes, rate and time left, and the cost accruing since
launch. Without one (a pipe, CI), a plain line per phase as it ends. Every event, Ansible's task
lines included, also goes to the session's log (`logs/<stack>-<command>.log` under the state dir,
0600); `--verbose` shows those lines too. `--json` bypasses this module: JSON lines, one per event.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from gpu_session import progress
from gpu_session.stack.automation import StackEvent, brief

UP = [
    ("plan", "plan"),
    ("launch", "launch"),
    ("boot", "boot and SSH"),
    ("host", "host set-up"),
    ("engine", "engine install"),
    ("download", "weights download"),
    ("load", "model load"),
    ("ready", "ready"),
]
DOWN = [("scrub", "scrub"), ("terminate", "terminate"), ("verify", "verify with the cloud")]


@dataclass
class Phase:
    title: str
    started: float | None = None  # time.monotonic()
    seconds: float | None = None  # when done
    failed: str = ""
    facts: dict = field(default_factory=dict)  # the download's bytes and total; a note of what was done instead

    @property
    def state(self) -> str:
        return "failed" if self.failed else "done" if self.seconds is not None else "running" if self.started else "waiting"


def size(n: float) -> str:
    """Bytes for a person: 1.2 GB, 340 MB (powers of 1000, as the Hub shows sizes)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


class SessionView:
    """Takes the flow's StackEvents and lines (`on_event`, `say`), keeps the phases, draws them."""

    def __init__(self, phases: list[tuple[str, str]], log: Path, *, console: Console | None = None, verbose: bool = False):
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.phases = {key: Phase(title) for key, title in phases}
        self.log = log.open("a")
        self.verbose = verbose
        self.price_per_hour: float | None = None  # USD/h, from the plan
        self.billed_since: float | None = None  # time.monotonic() at launch
        self.live = Live(self, console=self.console, refresh_per_second=4, transient=False) if self.console.is_terminal else None

    # --- what the flow reports -----------------------------------------------------------------

    def __enter__(self) -> SessionView:
        return self

    def begin(self) -> None:
        """Start drawing (after any question: a live view and a prompt do not mix)."""
        if self.live and not self.live.is_started:
            self.live.start()

    def __exit__(self, *exc) -> None:
        for phase in self.phases.values():  # an interrupted phase is not left spinning
            if phase.state == "running" and exc[0] is not None:
                phase.failed = "interrupted" if exc[0] in (KeyboardInterrupt,) else "stopped"
        if self.live and self.live.is_started:
            self.live.stop()
        self.log.close()

    def say(self, text: str) -> None:
        self._log(text)
        self._show(Text(text))

    def on_event(self, event: StackEvent) -> None:
        self._log(" ".join(str(x) for x in (event.kind, event.op, event.type, event.name, event.message) if x))
        found = progress.read(event.message) if event.kind == "log" else None
        if found:
            self._progress(found)
        elif event.kind == "notice" or (event.kind == "log" and self.verbose and event.message):
            self._show(Text(event.message, "dim"))
        elif event.kind == "failed":
            said = brief(event.message)  # a provider's traceback cut to its exception; the log has all of it
            running = [p for p in self.phases.values() if p.state == "running"]
            if running:
                running[-1].failed = said.splitlines()[0] if said else "failed"
            self._show(Text.assemble(("failed", "red"), f" {event.name}: {said}"))
        elif event.kind in ("start", "done") and event.op != "same":
            self._step(event)

    def planned(self, price_per_hour: float) -> None:
        """The plan was accepted at this rate (USD/h): from here on the view draws."""
        self.price_per_hour = price_per_hour
        self.start("plan")
        self.done("plan")
        self.begin()

    def start(self, key: str) -> None:
        phase = self.phases.get(key)
        if phase and phase.started is None:
            phase.started = time.monotonic()

    def done(self, key: str, seconds: float | None = None) -> None:
        phase = self.phases.get(key)
        if phase is None or phase.seconds is not None:
            return
        if phase.started is None:
            phase.started = time.monotonic()
        phase.seconds = seconds if seconds is not None else time.monotonic() - phase.started
        if not self.live:
            note = f" ({phase.facts['note']})" if phase.facts.get("note") else ""
            self.console.print(Text(f"{phase.title}: done in {phase.seconds:.0f}s{note}"))

    # --- from the engine's events to phases ----------------------------------------------------

    def _step(self, event: StackEvent) -> None:
        up = event.op in ("create", "update", "replace", "create-replacement")
        if event.type == "GpuInstance" and up:
            if event.kind == "start":
                self.start("launch")
            else:
                self.done("launch")  # a launch that needed no boot (an adopted machine)
                self.done("boot")
        elif event.type == "Configure" and up:
            if event.kind == "start":
                self.start("host")
            else:
                for key in ("host", "engine", "download", "load", "ready"):
                    if self.phases.get(key) and self.phases[key].started:
                        self.done(key)
                self.done("ready")
        elif event.type == "Configure" and event.op == "delete":
            (self.start if event.kind == "start" else self.done)("scrub")
        elif event.type in ("GpuInstance", "LambdaSshKey") and event.op == "delete":
            if event.kind == "start":
                self.start("terminate")
            elif event.type == "GpuInstance":
                self.done("terminate")
                self.start("verify")

    def _progress(self, found: dict) -> None:
        key, state = found["phase"], found["state"]
        if key == "boot" and state == "start":
            self.done("launch")
            self.billed_since = time.monotonic()
        if key in ("engine", "download") and state == "start":
            self.done("host")
        if state == "start":
            self.start(key)
        elif state == "running" and key in self.phases:
            self.start(key)
            self.phases[key].facts.update({k: v for k, v in found.items() if k not in ("phase", "state")})
        elif state == "done":
            if key in self.phases and found.get("note"):
                self.phases[key].facts["note"] = str(found["note"])  # what the phase did instead of its work
            self.done(key, found.get("seconds"))
            if key == "load":
                self.start("ready")  # what is left: the lease's watchdog

    # --- drawing -------------------------------------------------------------------------------

    def _show(self, text: Text) -> None:
        self.console.print(text)  # above the live view while it draws; Text: nothing said is taken as markup

    def _log(self, text: str) -> None:
        self.log.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self.log.flush()

    def __rich__(self) -> Group:
        table = Table.grid(padding=(0, 1))
        now = time.monotonic()
        for phase in self.phases.values():
            if phase.state == "waiting":
                continue
            mark = {"done": Text("✓", "green"), "failed": Text("✗", "red")}.get(phase.state) or Spinner("dots", style="cyan")
            took = phase.seconds if phase.seconds is not None else now - (phase.started or now)
            detail = phase.failed or self._detail(phase, took)
            table.add_row(mark, Text(phase.title), Text(f"{took:.0f}s", "dim"), Text(detail, "dim"))
        if self.price_per_hour is not None and self.billed_since is not None:
            spent = self.price_per_hour * (now - self.billed_since) / 3600
            table.add_row(
                Text("$"),
                Text("cost so far"),
                Text(f"${spent:.4f}"),
                Text(f"at ${self.price_per_hour:.2f}/h since launch", "dim"),
            )
        return Group(table)

    @staticmethod
    def _detail(phase: Phase, took: float) -> str:
        done, total = phase.facts.get("bytes"), phase.facts.get("total")
        if phase.facts.get("note"):
            return phase.facts["note"]
        if done is None:
            return ""
        if total and (phase.state == "done" or done > total):
            done = total  # the folder also holds the config and tokenizer, which the total leaves out
        rate = done / took if took > 0 else 0
        shown = f"{size(done)}" + (f" of {size(total)}" if total else "") + f", {size(rate)}/s"
        if total and rate > 0 and phase.state == "running":
            shown += f", {max(total - done, 0) / rate:.0f}s left"
        return shown
