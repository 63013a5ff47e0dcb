"""A stand-in for the Pulumi engine, for machines without the Pulumi CLI (ours: no registry ships it).

It runs the real program (infra/__main__.py) under `pulumi.runtime.set_mocks`, and its mocks do
what the engine would: unpickle each dynamic resource's `__provider`, configure it with the stack's
config, and call its check / diff / create / update / delete / read against the real clouds (the
simulator in tests); for `command:local:Command` it runs the create / update / delete strings with
their environment, as pulumi-command does. State is a JSON file per stack, written after every
step, so a crash leaves what was created on record. Secret values are written encrypted with the
stack's key (the provider pickle stays readable: it is by reference and holds no secret).

Deliberately small: one resource at a time, replacements delete first (our program asks for
that everywhere), and a replaced resource's dependents are deleted before it (scrub before
terminate). `MockEngine` (in gpu_session.stack) runs this module as a subprocess, as the
Automation API runs the CLI, and reads its events from stdout.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVENT_PREFIX = "@@gpu-session-event "
SECRET_SIG = "4dabf18193072939515e22adb298388d"  # pulumi's marker for a secret value
COMMAND = "command:local:Command"
DYNAMIC = "pulumi-python:dynamic"
KEPT_SECRETS = ("__provider",)


class StepFailed(RuntimeError):
    pass


# Ctrl-C or SIGTERM, as the engine takes them: the step in flight finishes (and is recorded), no new
# one starts; a second Ctrl-C stops at once.
CANCELLED = threading.Event()


def on_cancel(signum, frame) -> None:
    if CANCELLED.is_set() and signum == signal.SIGINT:
        raise KeyboardInterrupt
    CANCELLED.set()
    emit("log", message="cancelling: the step in flight will finish and be recorded")


def check_cancelled(what: str) -> None:
    if CANCELLED.is_set():
        raise StepFailed(f"cancelled before {what}")


def emit(kind: str, **fields) -> None:
    print(EVENT_PREFIX + json.dumps({"kind": kind, **fields}), flush=True)


# --- state ------------------------------------------------------------------------------------


def _unwrap(value, path: list, found: list[list]):
    """The plain value; the path of every secret inside it goes to `found`."""
    if isinstance(value, dict) and value.get(SECRET_SIG) == "1b47061264138c4ac30d75fd1eb44270":
        found.append(path)
        return _unwrap(value.get("value"), path, found)
    if isinstance(value, dict):
        return {k: _unwrap(v, [*path, k], found) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v, [*path, i], found) for i, v in enumerate(value)]
    return value


def unwrap_inputs(inputs: dict) -> tuple[dict, list[list]]:
    found: list[list] = []
    return {k: _unwrap(v, [k], found) for k, v in inputs.items()}, found


class Secrets:
    """Secret values in the state are encrypted (Fernet) with the stack's key, kept 0600 in the
    config dir, as Pulumi encrypts them with the stack's passphrase."""

    def __init__(self, key_file: Path):
        from cryptography.fernet import Fernet

        from .paths import write_private

        if not key_file.exists():
            write_private(key_file, Fernet.generate_key())
        self.fernet = Fernet(key_file.read_bytes())

    def _walk(self, props: dict, paths: list[list], change) -> dict:
        props = json.loads(json.dumps(props))
        for path in paths:
            if path[0] in KEPT_SECRETS:
                continue
            holder = props
            try:
                for key in path[:-1]:
                    holder = holder[key]
                holder[path[-1]] = change(holder[path[-1]])
            except (KeyError, IndexError, TypeError):
                continue  # not in these props (outputs may lack an input's key)
        return props

    def seal(self, props: dict, paths: list[list]) -> dict:
        """props with each secret value encrypted."""
        return self._walk(props, paths, lambda v: {"ciphertext": self.fernet.encrypt(json.dumps(v).encode()).decode()})

    def open(self, props: dict, paths: list[list]) -> dict:
        def plain(v):
            return json.loads(self.fernet.decrypt(v["ciphertext"].encode())) if isinstance(v, dict) and "ciphertext" in v else v

        return self._walk(props, paths, plain)


class State:
    """The stack's resources in registration order, sealed on disk, opened in memory."""

    def __init__(self, path: Path, secrets: Secrets):
        self.path, self.secrets = path, secrets
        data = json.loads(path.read_text()) if path.exists() else {}
        self.resources: list[dict] = [self._open(r) for r in data.get("resources", [])]
        self.outputs: dict = data.get("outputs", {})

    def _open(self, r: dict) -> dict:
        return {
            **r,
            "inputs": self.secrets.open(r["inputs"], r["secret"]),
            "outputs": self.secrets.open(r["outputs"], r["secret"]),
        }

    def _seal(self, r: dict) -> dict:
        return {
            **r,
            "inputs": self.secrets.seal(r["inputs"], r["secret"]),
            "outputs": self.secrets.seal(r["outputs"], r["secret"]),
        }

    def find(self, urn: str) -> dict | None:
        return next((r for r in self.resources if r["urn"] == urn), None)

    def put(self, record: dict) -> None:
        old = self.find(record["urn"])
        if old is None:
            self.resources.append(record)
        else:
            self.resources[self.resources.index(old)] = record
        self.save()

    def drop(self, urn: str) -> None:
        self.resources = [r for r in self.resources if r["urn"] != urn]
        self.save()

    def save(self) -> None:
        from .paths import write_private

        sealed = [self._seal(r) for r in self.resources]
        write_private(self.path, json.dumps({"resources": sealed, "outputs": self.outputs}, indent=2))


# --- the providers, as the engine calls them ----------------------------------------------------


def provider_of(props: dict, config: dict):
    import dill
    from pulumi.dynamic import ConfigureRequest
    from pulumi.dynamic.config import Config

    provider = dill.loads(base64.b64decode(props["__provider"]))
    provider.configure(ConfigureRequest(Config(raw_config=config, project_name=os.environ["PULUMI_PROJECT"])))
    return provider


def run_command(record_name: str, command: str, props: dict) -> str:
    env = {**os.environ, **{k: str(v) for k, v in (props.get("environment") or {}).items()}}
    proc = subprocess.Popen(
        ["/bin/sh", "-c", command], cwd=props.get("dir") or None, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        emit("log", name=record_name, message=line.rstrip("\n"))
    if proc.wait() != 0:
        raise StepFailed(f"{record_name}: command exited {proc.returncode}: {' | '.join(lines[-5:])}")
    return "\n".join(lines)


def changed_keys(old: dict, new: dict) -> list[str]:
    """Which keys differ (one level into dicts: environment variables), by name only."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            out.append(key)
    return out


def type_label(typ: str) -> str:
    return typ.rsplit(":", 1)[-1]


def delete(record: dict, config: dict) -> None:
    check_cancelled(f"deleting {type_label(record['type'])} {record['name']}")
    emit("start", op="delete", type=type_label(record["type"]), name=record["name"])
    started = time.monotonic()
    if record["type"] == COMMAND:
        if record["outputs"].get("delete"):
            run_command(record["name"], record["outputs"]["delete"], record["outputs"])
    else:
        provider_of(record["outputs"], config).delete(record["id"], record["outputs"])
    emit("done", op="delete", type=type_label(record["type"]), name=record["name"], seconds=round(time.monotonic() - started, 1))


# --- the run ----------------------------------------------------------------------------------


class Engine:
    def __init__(self, state: State, config: dict, preview: bool):
        self.state, self.config, self.preview = state, config, preview
        self.registered: list[str] = []
        self.deps: dict[str, list[str]] = {}

    def dependents(self, urn: str) -> list[dict]:
        """Resources on record that depend on urn, directly or not, latest first."""
        found: set[str] = {urn}
        for r in self.state.resources:
            if set(r.get("deps", [])) & found:
                found.add(r["urn"])
        return [r for r in reversed(self.state.resources) if r["urn"] in found and r["urn"] != urn]

    def step(self, urn: str, typ: str, name: str, raw_inputs: dict) -> tuple[str, dict]:
        try:
            return self._step(urn, typ, name, raw_inputs)
        except StepFailed:
            raise
        except Exception as e:  # what the engine reports: which resource, and the provider's words
            emit("failed", type=type_label(typ), name=name, message=str(e))
            raise StepFailed(f"{type_label(typ)} {name}: {type(e).__name__}: {e}") from None

    def _step(self, urn: str, typ: str, name: str, raw_inputs: dict) -> tuple[str, dict]:
        check_cancelled(f"{type_label(typ)} {name}")
        inputs, secret = unwrap_inputs(raw_inputs)
        self.registered.append(urn)
        old = self.state.find(urn)
        label = type_label(typ)
        if typ.startswith(DYNAMIC):
            provider = provider_of(inputs, self.config)
            checked = provider.check(old["inputs"] if old else {}, inputs)
            if checked.failures:
                raise StepFailed(f"{name}: " + "; ".join(f"{f.property}: {f.reason}" for f in checked.failures))
            inputs = checked.inputs
        op = self.plan(old, inputs, typ)
        emit("start", op=op, type=label, name=name)
        started = time.monotonic()
        if self.preview or op == "same":
            outputs = old["outputs"] if old else inputs
            rid = old["id"] if old else ""
        else:
            if op == "replace":
                for dependent in [*self.dependents(urn), old]:
                    delete(dependent, self.config)
                    self.state.drop(dependent["urn"])
            rid, outputs = self.apply(op, typ, name, old, inputs)
            self.state.put({
                "urn": urn, "type": typ, "name": name, "id": rid, "deps": self.deps.get(urn, []),
                "inputs": inputs, "outputs": outputs, "secret": secret,
            })  # fmt: skip
        emit("done", op=op, type=label, name=name, seconds=round(time.monotonic() - started, 1))
        return rid, outputs

    def plan(self, old: dict | None, inputs: dict, typ: str) -> str:
        if old is None:
            return "create"
        if typ == COMMAND:
            if inputs.get("triggers") != old["inputs"].get("triggers"):
                return "replace"
            changed = changed_keys(old["inputs"], inputs)
            if changed:
                emit("log", name=old["name"], message=f"changed: {', '.join(changed)}")
            return "update" if changed else "same"
        diff = provider_of(inputs, self.config).diff(old["id"], old["outputs"], inputs)
        if diff.replaces:
            return "replace"
        return "update" if diff.changes else "same"

    def apply(self, op: str, typ: str, name: str, old: dict | None, inputs: dict) -> tuple[str, dict]:
        if typ == COMMAND:
            command = inputs.get("update") if op == "update" and inputs.get("update") else inputs["create"]
            stdout = run_command(name, command, inputs)
            return (old["id"] if op == "update" else f"{name}-{int(time.time())}"), {**inputs, "stdout": stdout, "stderr": ""}
        provider = provider_of(inputs, self.config)
        if op == "update":
            return old["id"], provider.update(old["id"], old["outputs"], inputs).outs
        created = provider.create(inputs)
        return created.id, created.outs


def run_program(engine: Engine, project: str, stack: str) -> dict:
    """infra/__main__.py under mocks whose new_resource is the engine's step; the stack's exports."""
    import pulumi
    from pulumi.runtime import mocks, settings
    from pulumi.runtime.stack import run_pulumi_func
    from pulumi.runtime.sync_await import _sync_await

    class Mocks(pulumi.runtime.Mocks):
        def new_resource(self, args: pulumi.runtime.MockResourceArgs):
            urn = f"urn:pulumi:{stack}::{project}::{args.typ}::{args.name}"
            return engine.step(urn, args.typ, args.name, args.inputs)

        def call(self, args: pulumi.runtime.MockCallArgs):
            raise StepFailed(f"the program called {args.token}, which this engine does not serve")

    class Monitor(mocks.MockMonitor):
        def RegisterResource(self, request):  # noqa: N802 (gRPC's name): the dependencies mocks never see
            urn = f"urn:pulumi:{stack}::{project}::{request.type}::{request.name}"
            engine.deps[urn] = [d for d in request.dependencies if "::pulumi:pulumi:Stack::" not in d]
            return super().RegisterResource(request)

    m = Mocks()
    pulumi.runtime.set_mocks(m, project=project, stack=stack, preview=engine.preview, monitor=Monitor(m))
    pulumi.runtime.set_all_config({k: v for k, v in engine.config.items()})
    program = ROOT / "infra" / "__main__.py"
    sys.path.insert(0, str(program.parent))
    _sync_await(run_pulumi_func(lambda: runpy.run_path(str(program), run_name="__main__")))
    outputs = settings.get_root_resource().outputs
    resolved = _sync_await(pulumi.Output.from_input(outputs).future(with_unknowns=True))
    return {k: (None if not isinstance(v, str | int | float | bool | list | dict) else v) for k, v in resolved.items()}


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Run the stack's program with the mock engine")
    parser.add_argument("op", choices=["up", "preview", "destroy", "refresh"])
    parser.add_argument("--stack", required=True)
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--secrets-key", required=True, type=Path)
    args = parser.parse_args()
    request = json.loads(sys.stdin.read() or "{}")  # {"config": {...}}: secrets arrive here, never in argv
    config = request.get("config", {})
    project = os.environ.setdefault("PULUMI_PROJECT", "gpu-session")
    # One operation on a stack at a time (the engine's lock): a second waits for the first, even for
    # one whose caller was killed, and the lock goes with a process that dies.
    lock = os.open(args.state.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT, 0o600)  # held for the process's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        emit("log", message=f"another operation on stack {args.stack} is running: waiting for it to end")
        fcntl.flock(lock, fcntl.LOCK_EX)
    state = State(args.state, Secrets(args.secrets_key))
    signal.signal(signal.SIGINT, on_cancel)
    signal.signal(signal.SIGTERM, on_cancel)
    try:
        if args.op in ("up", "preview"):
            engine = Engine(state, config, preview=args.op == "preview")
            outputs = run_program(engine, project, args.stack)
            if args.op == "up":
                for record in [r for r in reversed(state.resources) if r["urn"] not in engine.registered]:
                    delete(record, config)
                    state.drop(record["urn"])
                state.outputs = outputs
                state.save()
            emit("outputs", outputs=outputs)
        elif args.op == "destroy":
            for record in list(reversed(state.resources)):
                delete(record, config)
                state.drop(record["urn"])
            state.outputs = {}
            state.save()
        else:  # refresh
            for record in list(state.resources):
                if record["type"] == COMMAND:
                    continue
                read = provider_of(record["outputs"], config).read(record["id"], record["outputs"])
                if not read.id:
                    emit("done", op="refresh-delete", type=type_label(record["type"]), name=record["name"])
                    state.drop(record["urn"])
                else:
                    state.put({**record, "outputs": read.outs})
    except Exception as e:  # one line the caller can show; the state on disk says what exists
        emit("failed", message=f"{type(e).__name__}: {e}" if not isinstance(e, StepFailed) else str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
