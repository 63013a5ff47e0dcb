"""The stack: one Pulumi stack per session, driven through a small seam (`StackEngine`).

`PulumiEngine` is the real thing: the Automation API over this repository's project (Pulumi.yaml,
infra/), a local file backend under the state dir unless PULUMI_BACKEND_URL says otherwise,
passphrase secrets with a generated passphrase kept 0600 in the config dir unless
PULUMI_CONFIG_PASSPHRASE(_FILE) is set, and the provider process pointed at this Python and this
package. `MockEngine` runs the same program and providers with gpu_session.mock_engine standing in
for the CLI: what the tests use, as no registry here ships the Pulumi CLI.
`engine(stack)` picks: GPU_SESSION_ENGINE=mock, else Pulumi.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .paths import config_dir, private_dir, state_dir, write_private
from .stack_config import NAMESPACE, SECRETS

ROOT = Path(__file__).resolve().parent.parent  # Pulumi.yaml, infra/
INSTALL_PULUMI = (
    "The Pulumi CLI is not installed. Install it the official way and open a new shell:\n"
    "  curl -fsSL https://get.pulumi.com | sh        (Linux, macOS; or: brew install pulumi/tap/pulumi)\n"
    "  https://www.pulumi.com/docs/iac/download-install/   (Windows and other options)"
)


@dataclass
class StackEvent:
    kind: str  # "start", "done", "failed", "log"
    op: str = ""  # create, update, replace, delete, same, refresh-delete
    type: str = ""  # GpuInstance, LambdaSshKey, Command
    name: str = ""  # the resource's name in the program
    message: str = ""
    seconds: float = 0.0


class StackError(RuntimeError):
    """An operation on the stack failed; the message says which resource and why."""


class StackCancelled(StackError):
    """Ctrl-C or SIGTERM came during the operation: what finished is recorded, the rest was not started."""


class PulumiMissing(StackError):
    def __init__(self):
        super().__init__(INSTALL_PULUMI)


OnEvent = Callable[[StackEvent], None]


def _ignore(_: StackEvent) -> None:
    pass


def namespaced(values: dict[str, str]) -> dict[str, str]:
    return {k if ":" in k else f"{NAMESPACE}:{k}": str(v) for k, v in values.items()}


class StackEngine(ABC):
    """What the session needs of a stack."""

    def __init__(self, stack: str):
        self.stack = stack

    @abstractmethod
    def set_config(self, values: dict[str, str]) -> None:
        """Replace the stack's config: keys as in Pulumi.example.yaml (secrets are stored as secrets)."""

    @abstractmethod
    def config(self) -> dict[str, str]:
        """The stack's config, keys without the namespace."""

    @abstractmethod
    def up(self, on_event: OnEvent = _ignore) -> dict: ...

    @abstractmethod
    def preview(self, on_event: OnEvent = _ignore) -> None: ...

    @abstractmethod
    def destroy(self, on_event: OnEvent = _ignore) -> None: ...

    @abstractmethod
    def refresh(self, on_event: OnEvent = _ignore) -> None: ...

    @abstractmethod
    def outputs(self) -> dict: ...

    @abstractmethod
    def cancel(self) -> None:
        """Clear what an interrupted operation left (the backend's lock)."""

    @abstractmethod
    def remove(self) -> None:
        """Forget the stack (after destroy): its state and its config, secrets included."""


# --- Ctrl-C -----------------------------------------------------------------------------------


class Presses:
    count = 0


@contextmanager
def sigint_guard(say: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Iterator[Presses]:
    """The first Ctrl-C lets operations in flight finish (the engine, in our process group, got the
    same signal and is cancelling gracefully; killing it now would orphan a launching GPU). The second
    raises KeyboardInterrupt here, as it makes the engine stop at once. Yields how many came."""
    presses = Presses()

    def handler(signum, frame):
        presses.count += 1
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


def pulumi_binary() -> Path:
    found = shutil.which("pulumi") or str(Path.home() / ".pulumi" / "bin" / "pulumi")
    if not os.access(found, os.X_OK):
        raise PulumiMissing()
    return Path(found)


def passphrase_env() -> dict[str, str]:
    """PULUMI_CONFIG_PASSPHRASE(_FILE) when the user set one; else a generated passphrase file."""
    if os.environ.get("PULUMI_CONFIG_PASSPHRASE") or os.environ.get("PULUMI_CONFIG_PASSPHRASE_FILE"):
        return {}
    path = config_dir() / "pulumi-passphrase"
    if not path.exists():
        write_private(path, secrets.token_urlsafe(32))
    return {"PULUMI_CONFIG_PASSPHRASE_FILE": str(path)}


def pulumi_env() -> dict[str, str]:
    backend = os.environ.get("PULUMI_BACKEND_URL") or f"file://{private_dir(state_dir() / 'pulumi')}"
    return {
        "PULUMI_BACKEND_URL": backend,
        "PULUMI_SKIP_UPDATE_CHECK": "true",
        # The provider process must run this Python and import this package (pulumi#7960, #7061).
        "PULUMI_PYTHON_CMD": sys.executable,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        **passphrase_env(),
    }


def engine_event(event) -> StackEvent | None:
    """An Automation API EngineEvent as ours (None for the ones we do not show)."""
    if event.resource_pre_event is not None:
        meta = event.resource_pre_event.metadata
        return StackEvent("start", str(meta.op.value), meta.type.rsplit(":", 1)[-1], meta.urn.rsplit("::", 1)[-1])
    if event.res_outputs_event is not None:
        meta = event.res_outputs_event.metadata
        return StackEvent("done", str(meta.op.value), meta.type.rsplit(":", 1)[-1], meta.urn.rsplit("::", 1)[-1])
    if event.res_op_failed_event is not None:
        meta = event.res_op_failed_event.metadata
        return StackEvent("failed", str(meta.op.value), meta.type.rsplit(":", 1)[-1], meta.urn.rsplit("::", 1)[-1])
    if event.diagnostic_event is not None and event.diagnostic_event.message.strip():
        d = event.diagnostic_event
        name = (d.urn or "").rsplit("::", 1)[-1]
        kind = "failed" if d.severity == "error" else "log"
        return StackEvent(kind, name=name, message=d.message.strip())
    return None


class PulumiEngine(StackEngine):
    def __init__(self, stack: str, create: bool = True):
        super().__init__(stack)
        from pulumi import automation as auto

        binary = pulumi_binary()
        self._auto = auto
        select = auto.create_or_select_stack if create else auto.select_stack
        try:
            self._stack = select(
                stack_name=stack,
                work_dir=str(ROOT),
                opts=auto.LocalWorkspaceOptions(
                    env_vars=pulumi_env(),
                    pulumi_command=auto.PulumiCommand(root=str(binary.parent.parent)),
                    secrets_provider="passphrase",
                ),
            )
        except auto.errors.StackNotFoundError:
            raise StackError(f"no stack {stack}") from None

    def _run(self, what: str, call):
        with sigint_guard() as pressed:
            try:
                result = call()
            except self._auto.errors.CommandError as e:
                if pressed.count:
                    raise StackCancelled(f"pulumi {what} cancelled on stack {self.stack}") from None
                raise StackError(f"pulumi {what} failed on stack {self.stack}: {e}") from None
        if pressed.count:
            raise StackCancelled(f"pulumi {what} on stack {self.stack} finished, but was cancelled")
        return result

    def _handler(self, on_event: OnEvent):
        def handle(event) -> None:
            ours = engine_event(event)
            if ours is not None:
                on_event(ours)

        return handle

    def set_config(self, values: dict[str, str]) -> None:
        self._stack.set_all_config(
            {k: self._auto.ConfigValue(v, secret=k.split(":")[-1] in SECRETS) for k, v in namespaced(values).items()}
        )

    def config(self) -> dict[str, str]:
        prefix = f"{NAMESPACE}:"
        return {k.removeprefix(prefix): v.value for k, v in self._stack.get_all_config().items() if k.startswith(prefix)}

    def up(self, on_event: OnEvent = _ignore) -> dict:
        result = self._run("up", lambda: self._stack.up(on_event=self._handler(on_event), color="never"))
        return {k: v.value for k, v in result.outputs.items()}

    def preview(self, on_event: OnEvent = _ignore) -> None:
        self._run("preview", lambda: self._stack.preview(on_event=self._handler(on_event), color="never"))

    def destroy(self, on_event: OnEvent = _ignore) -> None:
        self._run("destroy", lambda: self._stack.destroy(on_event=self._handler(on_event), color="never"))

    def refresh(self, on_event: OnEvent = _ignore) -> None:
        self._run("refresh", lambda: self._stack.refresh(on_event=self._handler(on_event), color="never"))

    def outputs(self) -> dict:
        return {k: v.value for k, v in self._stack.outputs().items()}

    def cancel(self) -> None:
        self._stack.cancel()

    def remove(self) -> None:
        self._stack.workspace.remove_stack(self.stack)


# --- the mock engine --------------------------------------------------------------------------


class MockEngine(StackEngine):
    """The same program and providers, run by gpu_session.mock_engine in a child process (as the
    Automation API runs the CLI). Its config file (0600, under the config dir) plays Pulumi.<stack>.yaml."""

    def __init__(self, stack: str):
        super().__init__(stack)
        self.state = private_dir(state_dir() / "mock-engine") / f"{stack}.json"
        self.config_file = private_dir(config_dir() / "mock-engine") / f"{stack}.json"

    def set_config(self, values: dict[str, str]) -> None:
        write_private(self.config_file, json.dumps(namespaced(values)))

    def config(self) -> dict[str, str]:
        stored = json.loads(self.config_file.read_text()) if self.config_file.exists() else {}
        return {k.removeprefix(f"{NAMESPACE}:"): v for k, v in stored.items() if k.startswith(f"{NAMESPACE}:")}

    def _run(self, op: str, on_event: OnEvent) -> dict:
        from .mock_engine import EVENT_PREFIX

        config = json.loads(self.config_file.read_text()) if self.config_file.exists() else {}
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_session.mock_engine", op, "--stack", self.stack, "--state", str(self.state),
             "--secrets-key", str(self.config_file.with_suffix(".key"))],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PULUMI_PROJECT": "gpu-session", "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        proc.stdin.write(json.dumps({"config": config}))
        proc.stdin.close()
        outputs, failure, said = {}, "", []
        with sigint_guard() as pressed:
            for line in proc.stdout:
                if not line.startswith(EVENT_PREFIX):
                    said.append(line.rstrip())
                    on_event(StackEvent("log", message=line.rstrip()))
                    continue
                data = json.loads(line[len(EVENT_PREFIX) :])
                if data["kind"] == "outputs":
                    outputs = data["outputs"]
                    continue
                if data["kind"] == "failed":
                    failure = data.get("message", "")
                on_event(StackEvent(**{k: v for k, v in data.items() if k in StackEvent.__dataclass_fields__}))
            rc = proc.wait()
        if pressed.count:
            raise StackCancelled(f"{op} cancelled on stack {self.stack}" + (f": {failure}" if failure else ""))
        if rc != 0:
            raise StackError(f"{op} failed on stack {self.stack}: {failure or ' | '.join(said[-5:]) or f'exit {rc}'}")
        return outputs

    def up(self, on_event: OnEvent = _ignore) -> dict:
        return self._run("up", on_event)

    def preview(self, on_event: OnEvent = _ignore) -> None:
        self._run("preview", on_event)

    def destroy(self, on_event: OnEvent = _ignore) -> None:
        self._run("destroy", on_event)

    def refresh(self, on_event: OnEvent = _ignore) -> None:
        self._run("refresh", on_event)

    def outputs(self) -> dict:
        return json.loads(self.state.read_text()).get("outputs", {}) if self.state.exists() else {}

    def resources(self) -> list[dict]:
        """What the state records (type, name, id): for status and tests."""
        if not self.state.exists():
            return []
        return [{k: r[k] for k in ("type", "name", "id")} for r in json.loads(self.state.read_text())["resources"]]

    def cancel(self) -> None:
        pass  # no lock to clear: the state is rewritten after every step

    def remove(self) -> None:
        if self.resources():
            raise StackError(f"stack {self.stack} still has resources: destroy it first")
        for path in (self.state, self.state.with_suffix(".lock"), self.config_file, self.config_file.with_suffix(".key")):
            path.unlink(missing_ok=True)


def engine(stack: str, create: bool = True) -> StackEngine:
    """The stack (created on first use unless `create` is False: then StackError when there is none)."""
    if os.environ.get("GPU_SESSION_ENGINE") == "mock":
        return MockEngine(stack)
    return PulumiEngine(stack, create)
