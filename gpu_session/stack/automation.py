"""The stacks: one Pulumi stack per session (project gpu-session: Pulumi.yaml, infra/), and one
per cache volume (project gpu-session-cache: infra/cache/), driven through the Automation API
(`PulumiEngine`).

`PulumiEngine` is the Automation API over one of this repository's projects and the `pulumi` CLI: a local file backend under the state dir unless PULUMI_BACKEND_URL says otherwise,
passphrase secrets with a generated passphrase kept 0600 in the config dir unless
PULUMI_CONFIG_PASSPHRASE(_FILE) is set, the program and its provider processes pointed at this
Python and this package, and no plugin downloads (every provider of ours is a dynamic one).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gpu_session.clouds import CapacityError
from gpu_session.errors import GpuSessionError
from gpu_session.local.daemon import alive
from gpu_session.paths import (
    ASSETS,
    PACKAGE_PARENT,
    checked_stack_name,
    config_dir,
    make_private,
    private_dir,
    state_dir,
    write_private,
)

from .config import NAMESPACE, SECRETS
from .names import CACHE_PROJECT, PROJECT

# Each project: its Pulumi.yaml (under ASSETS), and the folder of its stacks' workspaces under the
# state dir (apart, so a session stack and a cache stack of one name never share a folder).
PROJECTS = {
    PROJECT: ("Pulumi.yaml", "workspaces"),
    CACHE_PROJECT: ("infra/cache/Pulumi.yaml", "cache-workspaces"),
}

INSTALL_PULUMI = (
    "The Pulumi CLI is not installed. Install it the official way and open a new shell:\n"
    "  curl -fsSL https://get.pulumi.com | sh        (Linux, macOS; or: brew install pulumi/tap/pulumi)\n"
    "  https://www.pulumi.com/docs/iac/download-install/   (Windows and other options)\n"
    "or, in a checkout on a machine without the internet but with Go and a Go module proxy: scripts/install-pulumi"
)


@dataclass
class StackEvent:
    kind: str  # "start", "done", "failed", "log" (a resource's provider said it), "notice" (ours, for the person)
    op: str = ""  # the engine's: create, update, replace, delete, same, refresh, …
    type: str = ""  # GpuInstance, LambdaSshKey, Configure
    name: str = ""  # the resource's name in the program
    message: str = ""
    seconds: float = 0.0


class StackError(GpuSessionError, RuntimeError):
    """An operation on the stack failed; the message says which resource and why."""


class StackNotFound(StackError):
    """No stack of that name (asked for without creating it)."""


class StackCancelled(StackError):
    """Ctrl-C or SIGTERM came during the operation: what finished is recorded, the rest was not started."""


class NoCapacity(StackError):
    """The cloud had no capacity for any offer the stack's instance could take (clouds.CapacityError
    in the provider); another offer may have some."""


class PulumiMissing(StackError):
    def __init__(self):
        super().__init__(INSTALL_PULUMI)


OnEvent = Callable[[StackEvent], None]


def _ignore(_: StackEvent) -> None:
    pass


def namespaced(values: dict[str, str]) -> dict[str, str]:
    return {k if ":" in k else f"{NAMESPACE}:{k}": str(v) for k, v in values.items()}


# --- Ctrl-C -----------------------------------------------------------------------------------


# One interrupt may come twice: `timeout` and CI runners signal a process and then its process
# group, which holds it too. A signal this soon after the last one taken is that same interrupt, not
# a second Ctrl-C; a person pressing again takes longer.
SAME_INTERRUPT_S = 0.2


class Interrupts:
    """The interrupts taken (count), one delivered twice at once counted once."""

    def __init__(self) -> None:
        self.count = 0
        self._taken = float("-inf")  # time.monotonic() of the last one taken

    def take(self) -> bool:
        """Whether this signal is a new interrupt (and count it), not the last one delivered again."""
        now = time.monotonic()
        if now - self._taken < SAME_INTERRUPT_S:
            return False
        self._taken = now
        self.count += 1
        return True


def take_sigterm_as_ctrl_c() -> None:
    """SIGTERM (a closed terminal, a cancelled CI job) is taken like Ctrl-C: SIGINT to our process
    group, so the engine finishes the step in flight and starts no other. A SIGTERM delivered twice
    at once is passed on once: two SIGINTs would stop the engine at once."""
    sigterms = Interrupts()
    signal.signal(signal.SIGTERM, lambda signum, frame: sigterms.take() and os.killpg(os.getpgrp(), signal.SIGINT))


@contextmanager
def sigint_guard(say: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Iterator[Interrupts]:
    """The first Ctrl-C lets operations in flight finish (the engine, in our process group, got the
    same signal and is cancelling gracefully; killing it now would orphan a launching GPU). The second
    (SAME_INTERRUPT_S or more after the first) raises KeyboardInterrupt here, as it makes the engine
    stop at once. Yields the interrupts taken."""
    presses = Interrupts()

    def handler(signum, frame):
        if not presses.take():
            return
        if presses.count == 1:
            say(
                "\nCancelling: operations in flight will finish and be recorded. Ctrl-C again to stop at once (may orphan a GPU)."
            )
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield presses
    finally:
        signal.signal(signal.SIGINT, previous)


# --- Pulumi -----------------------------------------------------------------------------------


# How a stack's exported deployment marks a secret, beside its "plaintext" (JSON) once decrypted:
# {SIG_KEY: SECRET_SIG, "plaintext": …} (Pulumi's sig.Key and sig.Secret, sdk/go/common/resource/sig;
# the Python SDK's pulumi.runtime.rpc._special_sig_key and _special_secret_sig).
SIG_KEY, SECRET_SIG = "4dabf18193072939515e22adb298388d", "1b47061264138c4ac30d75fd1eb44270"


def pulumi_binary() -> Path:
    """The `pulumi` CLI: on PATH, else where the official installer and scripts/install-pulumi put it
    ($PULUMI_HOME/bin, ~/.pulumi/bin). PulumiMissing, saying how to install it, when there is none."""
    homes = [os.environ.get("PULUMI_HOME", ""), str(Path.home() / ".pulumi")]
    for found in [shutil.which("pulumi") or "", *(str(Path(h) / "bin" / "pulumi") for h in homes if h)]:
        if found and os.access(found, os.X_OK):
            return Path(found)
    raise PulumiMissing()


@functools.cache
def pulumi_command(binary: Path):
    """The Automation API's PulumiCommand for `binary`, one per process: making one runs `pulumi
    version` (a subprocess, ~0.15 s), and an `up` opens the session's stack and its cache's. It runs
    <root>/bin/pulumi, or `pulumi` from PATH when given no root: a CLI on PATH outside a bin/ folder
    (the release tarball's pulumi/pulumi) has no root. Raises the Automation API's InvalidVersionError
    for a CLI older than its minimum."""
    from pulumi import automation as auto

    return auto.PulumiCommand(root=str(binary.parent.parent) if binary.parent.name == "bin" else None)


def passphrase_env() -> dict[str, str]:
    """PULUMI_CONFIG_PASSPHRASE(_FILE) when the user set one; else a generated passphrase file."""
    if os.environ.get("PULUMI_CONFIG_PASSPHRASE") or os.environ.get("PULUMI_CONFIG_PASSPHRASE_FILE"):
        return {}
    path = config_dir() / "pulumi-passphrase"
    if not path.exists():  # never replaced: two first runs at once agree on the first one's
        write_private(path, secrets.token_urlsafe(32), replace=False)
    return {"PULUMI_CONFIG_PASSPHRASE_FILE": str(path)}


def pulumi_env() -> dict[str, str]:
    backend = os.environ.get("PULUMI_BACKEND_URL") or f"file://{private_dir(state_dir() / 'pulumi')}"
    return {
        "PULUMI_BACKEND_URL": backend,
        "PULUMI_SKIP_UPDATE_CHECK": "true",
        # Our providers are dynamic ones (no plugin): a plugin the engine would fetch is a mistake, said at once.
        "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
        # The provider process must run this Python and import this package (pulumi#7960, #7061).
        "PULUMI_PYTHON_CMD": sys.executable,
        "PYTHONPATH": os.pathsep.join(p for p in (str(PACKAGE_PARENT), os.environ.get("PYTHONPATH", "")) if p),
        **passphrase_env(),
    }


def workspaces(project: str = PROJECT) -> Path:
    """The folder of the project's stacks' workspaces (not created here)."""
    if project not in PROJECTS:
        raise StackError(f"unknown Pulumi project {project!r}: one of {', '.join(PROJECTS)}")
    return state_dir() / PROJECTS[project][1]


def workspace(stack: str, project: str = PROJECT) -> Path:
    """The stack's own project folder under the state dir (0700): a Pulumi.yaml that is this
    checkout's with `main` pointing back at its program (infra/, or infra/cache/), and beside it
    the stack's config (Pulumi.<stack>.yaml, secrets encrypted). So a session's config never lands
    in the checkout, where `pulumi stack init` by hand, with its own passphrase, would meet it."""
    import yaml

    folder = private_dir(workspaces(project) / checked_stack_name(stack))
    source = ASSETS / PROJECTS[project][0]
    project_file = yaml.safe_load(source.read_text())
    project_file["main"] = os.path.relpath(source.parent / project_file.get("main", "."), folder)
    write_private(folder / "Pulumi.yaml", yaml.safe_dump(project_file, sort_keys=False))
    return folder


# What the engine says after any failed resource: noise beside the resource's own failure.
ENGINE_AFTERWORDS = ("update failed", "destroy failed", "refresh failed", "Resource monitor has terminated, shutting down")


def brief(message: str) -> str:
    """What a person needs of a failure: a provider's Python traceback cut to its last line (the
    exception), the engine's own lines as they are."""
    if "Traceback (most recent call last)" not in message:
        return message
    head = message.split("Traceback (most recent call last)", 1)[0].strip()
    last = [line.strip() for line in message.splitlines() if line.strip()][-1]
    last = re.sub(r"^(?:\w+\.)+(\w+: )", r"\1", last)  # gpu_session.clouds.base.InvalidRequest: … → InvalidRequest: …
    return f"{head} {last}".strip()


def engine_event(event) -> StackEvent | None:
    """An Automation API EngineEvent as ours (None for the ones we do not show: the engine's debug
    lines, and the steps of the stack itself and of provider references, `pulumi:*` types)."""
    for kind, step in (
        ("start", event.resource_pre_event),
        ("done", event.res_outputs_event),
        ("failed", event.res_op_failed_event),
    ):
        if step is not None:
            meta = step.metadata
            if meta.type.startswith("pulumi:") and kind != "failed":
                return None
            return StackEvent(kind, str(meta.op.value), meta.type.rsplit(":", 1)[-1], meta.urn.rsplit("::", 1)[-1])
    if event.diagnostic_event is not None and event.diagnostic_event.message.strip():
        d = event.diagnostic_event
        if d.severity == "debug":  # the engine's and the SDK's own tracing ("registering resource: …")
            return None
        name = (d.urn or "").rsplit("::", 1)[-1]
        kind = "failed" if d.severity == "error" else "log"
        return StackEvent(kind, name=name, message=d.message.strip())
    return None


class PulumiEngine:
    """One stack of one of our projects (the session's by default, or names.CACHE_PROJECT), through
    the Automation API and the `pulumi` CLI. Every operation first tidies what a killed one left
    (`recover`); events come as StackEvents, never with secrets shown; Ctrl-C is taken as
    `sigint_guard` says."""

    def __init__(self, stack: str, create: bool = True, project: str = PROJECT):
        from pulumi import automation as auto

        self.stack = stack
        self.project = project
        binary = pulumi_binary()
        self._auto = auto
        self._env = pulumi_env()
        self.folder = workspace(stack, project)
        # Made by this object, and no operation of ours has run on it since: it has no outputs, which
        # outputs() (two CLI processes) then knows without asking (up asks at once).
        self._created = False
        ws = auto.LocalWorkspace(
            work_dir=str(self.folder), env_vars=self._env, pulumi_command=pulumi_command(binary), secrets_provider="passphrase"
        )
        try:
            self._stack = auto.Stack.select(stack, ws)
        except auto.errors.StackNotFoundError:
            if not create:
                shutil.rmtree(self.folder, ignore_errors=True)  # looking leaves nothing behind
                raise StackNotFound(f"no stack {stack}") from None
            try:
                self._stack = auto.Stack.create(stack, ws)
                self._created = True
            except auto.errors.StackAlreadyExistsError:  # another process made it in between: it may hold state
                self._stack = auto.Stack.select(stack, ws)
        self._make_private()

    def _run(self, what: str, operation, on_event: OnEvent, **options):
        """Run `operation` (a method of the Automation API's Stack) with our event handler; StackError
        with what the engine said went wrong, StackCancelled after Ctrl-C. Its result."""
        failures: list[str] = []
        started: dict[tuple[str, str], float] = {}  # when each resource's step began: its seconds when done

        def handle(event) -> None:
            ours = engine_event(event)
            if ours is None:
                return
            if ours.kind == "start":
                started[ours.type, ours.name] = time.monotonic()
            elif ours.kind in ("done", "failed") and (ours.type, ours.name) in started:
                ours.seconds = time.monotonic() - started.pop((ours.type, ours.name))
            if ours.kind == "failed" and ours.message and brief(ours.message) not in failures:
                failures.append(brief(ours.message))  # the whole of it reached on_event (and the log)
            on_event(ours)

        self._created = False  # from now on the stack may hold state
        with sigint_guard() as pressed:
            try:
                result = operation(on_event=handle, color="never", **options)
            except self._auto.errors.CommandError as e:
                self._make_private()
                if pressed.count:
                    raise StackCancelled(f"pulumi {what} cancelled on stack {self.stack}") from None
                # The resources' own failures, without the engine's words for any failure after them.
                said = "; ".join([f for f in failures if f not in ENGINE_AFTERWORDS] or failures) or str(e)
                # The provider's CapacityError reaches us as text: typed again here, at the seam.
                failed = NoCapacity if CapacityError.__name__ in said or "no capacity" in said else StackError
                raise failed(f"pulumi {what} failed on stack {self.stack}: {said}") from None
        self._make_private()
        if pressed.count:
            raise StackCancelled(f"pulumi {what} on stack {self.stack} finished, but was cancelled")
        return result

    def _make_private(self) -> None:
        """The file backend writes its state, backups and history 0644 in 0755 folders (inside our
        0700 state folder): make them 0600 and 0700 like every other file of ours."""
        ours = state_dir() / "pulumi"  # a backend the user chose elsewhere keeps the modes they gave it
        if self._env["PULUMI_BACKEND_URL"] == f"file://{ours}":
            make_private(ours)
        make_private(self.folder)

    def set_config(self, values: dict[str, str]) -> None:
        """Replace the stack's config: keys as in Pulumi.example.yaml (secrets are stored as secrets);
        a key of ours that `values` lacks is removed, so an earlier session's setting never lingers.
        Secret values reach the CLI on its standard input, never on its command line (which the
        Automation API's set_all_config would use, and which any process on the machine can read).
        Only what differs from the stack's config is written (each CLI process costs a few hundred ms,
        a secret's most: it derives the passphrase's key): a key already holding its value, as a secret
        when it is one, is left as it is."""
        wanted = namespaced(values)
        # Secrets decrypted: compared here, never shown. A stack whose config file holds none (a new
        # one: a session's, after the last one's `down`) is not asked (a CLI process that derives
        # the passphrase's key).
        current = self._stack.get_all_config() if self._has_config() else {}
        stale = [k for k in current if k.startswith(f"{NAMESPACE}:") and k not in wanted]
        if stale:
            self._stack.remove_all_config(stale)

        def secret(key: str) -> bool:
            return key.split(":")[-1] in SECRETS

        changed = {k: v for k, v in wanted.items() if k not in current or (current[k].value, current[k].secret) != (v, secret(k))}
        plain = {k: self._auto.ConfigValue(v) for k, v in changed.items() if not secret(k)}
        if plain:
            self._stack.set_all_config(plain)
        for key, value in changed.items():  # one process each: `config set-all` takes secrets only on its command line
            if secret(key):
                self._cli("config", "set", "--secret", key, stdin=value)
        self._make_private()

    def _has_config(self) -> bool:
        """Whether the stack's config file (Pulumi.<stack>.yaml in its workspace, where the local
        workspace keeps it) holds any key; True when it cannot be read as YAML (the CLI then says)."""
        import yaml

        try:
            return bool((yaml.safe_load((self.folder / f"Pulumi.{self.stack}.yaml").read_text()) or {}).get("config"))
        except FileNotFoundError:
            return False
        except (OSError, yaml.YAMLError, AttributeError):
            return True

    def _cli(self, *args: str, stdin: str = "") -> str:
        """The `pulumi` CLI on this stack, in its workspace, with the engine's environment: its output."""
        done = subprocess.run(
            [str(pulumi_binary()), "--non-interactive", *args, "--stack", self.stack],
            input=stdin, cwd=self.folder, env={**os.environ, **self._env}, capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise StackError(f"pulumi {' '.join(args[:2])} failed on stack {self.stack}: {done.stderr.strip()}")
        return done.stdout

    def config(self) -> dict[str, str]:
        """The stack's config, keys without the namespace."""
        prefix = f"{NAMESPACE}:"
        return {k.removeprefix(prefix): v.value for k, v in self._stack.get_all_config().items() if k.startswith(prefix)}

    def up(self, on_event: OnEvent = _ignore) -> dict:
        """`pulumi up`: the outputs (secret ones as plain values)."""
        self.recover(on_event)
        # show_secrets: the Automation API asks up, refresh and destroy to print secrets in events unless told not to.
        result = self._run("up", self._stack.up, on_event, show_secrets=False)
        return {k: v.value for k, v in result.outputs.items()}

    def preview(self, on_event: OnEvent = _ignore) -> None:
        self.recover(on_event)
        self._run("preview", self._stack.preview, on_event)

    def destroy(self, on_event: OnEvent = _ignore) -> None:
        self.recover(on_event)
        self._run("destroy", self._stack.destroy, on_event, show_secrets=False)

    def refresh(self, on_event: OnEvent = _ignore) -> None:
        self.recover(on_event)
        self._run("refresh", self._stack.refresh, on_event, show_secrets=False)

    def outputs(self, secrets: bool = True) -> dict:
        """The stack's outputs, secret ones as their values; with `secrets` False, secret ones as
        "[secret]", in one CLI process that decrypts nothing (the Automation API's outputs() runs
        two, one of them deriving the passphrase's key): for a caller that reads only plain outputs."""
        if self._created:
            return {}
        if not secrets:
            return json.loads(self._cli("stack", "output", "--json") or "{}")
        return {k: v.value for k, v in self._stack.outputs().items()}

    def export(self) -> dict:
        """The stack's deployment as `pulumi stack export --show-secrets` prints it: secrets decrypted
        (the Automation API always asks for them), so it is for this process only, never to print."""
        return self._stack.export_stack().deployment or {}

    def resources(self) -> list[dict]:
        """What the state records, in order: [{"type": "GpuInstance", "name": "gpu", "id": …,
        "pending": "", "outputs": {…}}] (secret outputs as their plain values: see export), then each operation a killed
        run started and never finished, with "pending" saying which ("creating", "updating", "deleting")."""
        return self._rows(self.export())

    @staticmethod
    def _rows(deployment: dict) -> list[dict]:
        """resources()'s rows of an exported deployment (secrets as their values when it has them)."""

        def plain(value):  # secrets as their values
            if isinstance(value, dict):
                if value.get(SIG_KEY) == SECRET_SIG and "plaintext" in value:
                    return json.loads(value["plaintext"])
                return {k: plain(v) for k, v in value.items()}
            return [plain(v) for v in value] if isinstance(value, list) else value

        def row(resource: dict, pending: str) -> dict:
            name, kind = resource["urn"].rsplit("::", 1)[-1], resource["type"].rsplit(":", 1)[-1]
            return {
                "type": kind,
                "name": name,
                "id": resource.get("id", ""),
                "pending": pending,
                "outputs": plain(resource.get("outputs") or {}),
            }

        return [row(r, "") for r in deployment.get("resources") or [] if not r["type"].startswith("pulumi:")] + [
            row(op["resource"], op["type"]) for op in deployment.get("pending_operations") or []
        ]  # the stack itself and provider references (pulumi:*) are left out

    def stale_locks(self) -> list[dict]:
        """Locks of a file backend left by a pulumi process of this machine that is gone (kill -9):
        [{"pid", "hostname", "username", "timestamp"}]. A lock of a live process, or of another
        machine, is never taken for stale."""
        backend = self._env["PULUMI_BACKEND_URL"]
        if not backend.startswith("file://"):
            return []
        root = Path(backend.removeprefix("file://").split("?", 1)[0]) / ".pulumi" / "locks"
        stale = []
        for path in root.glob(f"*/{self.project}/{self.stack}/*.json"):  # organization/<project>/<stack>/<uuid>.json
            try:
                lock = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if lock.get("hostname") == socket.gethostname() and not alive(int(lock.get("pid") or 0)):
                stale.append(lock)
        return stale

    def recover(self, on_event: OnEvent = _ignore) -> list[dict]:
        """Tidy what a killed operation (kill -9, a crash, a closed laptop) left, before the next one:
        a lock whose process is gone is removed (`pulumi cancel`), and pending creates are dropped
        from the state (`pulumi refresh --clear-pending-creates`). What a pending create may have
        launched is not lost: GpuInstance's create adopts a live instance of its deterministic name,
        and `invoke down` asks the cloud for anything of that name. The pending operations found (as
        resources() gives them, but secret outputs left encrypted)."""
        for lock in self.stale_locks():
            on_event(StackEvent("notice", message=f"pulumi (pid {lock['pid']}) was killed with the stack locked: unlocking it"))
            self._stack.cancel()
        # From the state as stored, secrets left encrypted (no key to derive). Asked even of a stack made
        # by this object: another process may have used it since (an up waits for its confirmation).
        pending = [r for r in self._rows(self._stored_state()) if r["pending"]]
        if any(r["pending"] == "creating" for r in pending):
            names = ", ".join(f"{r['type']} {r['name']}" for r in pending if r["pending"] == "creating")
            on_event(
                StackEvent("notice", message=f"an interrupted operation left {names} half-created: clearing it from the state")
            )
            self._run("refresh", self._stack.refresh, on_event, show_secrets=False, clear_pending_creates=True)
        return pending

    def _stored_state(self) -> dict:
        """The stack's deployment as `pulumi stack export` prints it without --show-secrets: secrets as
        their ciphertexts."""
        return json.loads(self._cli("stack", "export")).get("deployment") or {}

    def cancel(self) -> None:
        """Remove the stack's lock (`pulumi cancel`): only when no operation of it is running."""
        self._stack.cancel()

    def remove(self, force: bool = False) -> None:
        """Forget the stack (after destroy): its state and its config, secrets included. On our own
        file backend the CLI's leftovers go too: its <stack>.json.bak, and the backups/ and history/
        of the stack's updates, which hold the secrets' ciphertexts. `force`: even though the state
        still records resources (only for a stack known to hold none of ours: one whose first up
        failed keeps the record of the stack itself)."""
        self._stack.workspace.remove_stack(self.stack, force=force or None)
        shutil.rmtree(self.folder, ignore_errors=True)
        ours = private_dir(state_dir() / "pulumi")
        if self._env["PULUMI_BACKEND_URL"] == f"file://{ours}":
            stacks = ours / ".pulumi" / "stacks" / self.project
            for leftover in stacks.glob(f"{self.stack}.json*"):
                leftover.unlink(missing_ok=True)
            for kept in ("backups", "history"):  # checkpoints, and each update's record (its config too)
                shutil.rmtree(ours / ".pulumi" / kept / self.project / self.stack, ignore_errors=True)
            for locks in (ours / ".pulumi" / "locks").glob(f"*/{self.project}/{self.stack}"):
                with contextlib.suppress(OSError):  # the CLI leaves the stack's lock folder, empty; one that
                    locks.rmdir()  # holds a lock (an operation of another process) stays as it is


def engine(stack: str, create: bool = True, project: str = PROJECT) -> PulumiEngine:
    """The stack of `project` (the session's by default; created on first use unless `create` is
    False: then StackNotFound when there is none)."""
    return PulumiEngine(stack, create, project)
