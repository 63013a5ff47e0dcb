"""The stack without a cloud: finding the CLI, the environment the engine and provider process get,
Ctrl-C, engine events, and which locks a killed engine left."""

from __future__ import annotations

import os
import signal
import stat
import sys
from pathlib import Path

import pytest
from pulumi.automation import events

from gpu_session.stack import automation as stack


def test_without_the_cli_every_engine_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PULUMI_HOME", raising=False)
    with pytest.raises(stack.PulumiMissing) as e:
        stack.engine("dev")
    assert "curl -fsSL https://get.pulumi.com | sh" in str(e.value) and "not installed" in str(e.value)
    assert "scripts/install-pulumi" in str(e.value)  # the way on a machine without the internet


def test_the_cli_in_pulumis_own_install_folder_is_found(monkeypatch, tmp_path):
    binary = tmp_path / ".pulumi" / "bin" / "pulumi"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert stack.pulumi_binary() == binary


def test_a_cli_on_path_outside_a_bin_folder_runs(monkeypatch, tmp_path):
    """The release tarball unpacks to pulumi/pulumi, often put on PATH as it is: the engine runs that
    CLI (the Automation API's PulumiCommand wants a root with bin/pulumi in it, which it has not)."""
    dist = tmp_path / "pulumi"
    dist.mkdir()
    (dist / "pulumi").symlink_to(stack.pulumi_binary())
    monkeypatch.setenv("PATH", f"{dist}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert stack.pulumi_binary() == dist / "pulumi"
    with pytest.raises(stack.StackNotFound):
        stack.engine("nosuch", create=False)


def test_the_cli_is_asked_its_version_once_per_process(monkeypatch, tmp_path):
    """Each PulumiCommand runs `pulumi version`: an up opens its session's stack and its cache's, and
    status or cache list open every stack, so the command is made once per CLI."""
    real, calls = stack.pulumi_binary(), tmp_path / "calls"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pulumi").write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\nexec "{real}" "$@"\n')
    (tmp_path / "bin" / "pulumi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in ("one", "two", "three"):
        with pytest.raises(stack.StackNotFound):
            stack.engine(name, create=False)
    said = calls.read_text().splitlines()
    assert said.count("version") == 1 and sum(" stack select " in f" {line} " for line in said) == 3


def test_the_engine_environment(monkeypatch):
    for var in ("PULUMI_BACKEND_URL", "PULUMI_CONFIG_PASSPHRASE", "PULUMI_CONFIG_PASSPHRASE_FILE"):
        monkeypatch.delenv(var, raising=False)
    env = stack.pulumi_env()
    # The provider process runs this Python and imports this package (pulumi#7960, #7061).
    assert env["PULUMI_PYTHON_CMD"] == sys.executable and str(stack.PACKAGE_PARENT) in env["PYTHONPATH"].split(os.pathsep)
    backend = env["PULUMI_BACKEND_URL"].removeprefix("file://")
    assert env["PULUMI_BACKEND_URL"].startswith("file://") and stat.S_IMODE(os.stat(backend).st_mode) == 0o700
    # A generated passphrase, by file (never in an environment variable), 0600, the same every time.
    passphrase = env["PULUMI_CONFIG_PASSPHRASE_FILE"]
    assert stat.S_IMODE(os.stat(passphrase).st_mode) == 0o600 and len(open(passphrase).read()) >= 32  # noqa: SIM115
    assert stack.pulumi_env()["PULUMI_CONFIG_PASSPHRASE_FILE"] == passphrase and "PULUMI_CONFIG_PASSPHRASE" not in env

    monkeypatch.setenv("PULUMI_CONFIG_PASSPHRASE", "the user's own")
    monkeypatch.setenv("PULUMI_BACKEND_URL", "s3://bucket")
    env = stack.pulumi_env()
    assert "PULUMI_CONFIG_PASSPHRASE_FILE" not in env and env["PULUMI_BACKEND_URL"] == "s3://bucket"


def test_the_generated_passphrase_is_never_replaced(monkeypatch, tmp_path):
    """Two first runs at once (two commands) may both find no passphrase and make one: a stack
    encrypted with the first one's could never be read if the second one's replaced it."""
    for var in ("PULUMI_CONFIG_PASSPHRASE", "PULUMI_CONFIG_PASSPHRASE_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    path = Path(stack.passphrase_env()["PULUMI_CONFIG_PASSPHRASE_FILE"])
    first = path.read_text()
    monkeypatch.setattr(Path, "exists", lambda self: False)  # the second run looked before the first one wrote
    assert stack.passphrase_env()["PULUMI_CONFIG_PASSPHRASE_FILE"] == str(path) and path.read_text() == first
    assert len(first) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def test_the_first_ctrl_c_lets_operations_finish_and_the_second_stops(monkeypatch):
    """A signal that comes twice at once (`timeout`, a CI runner: to the process, then its group) is
    one interrupt; one a person sends again later stops at once. (The clock is ours to move.)"""
    said, now = [], [100.0]
    monkeypatch.setattr(stack.time, "monotonic", lambda: now[0])
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), stack.sigint_guard(said.append) as presses:
        os.kill(os.getpid(), signal.SIGINT)
        assert len(said) == 1 and "in flight will finish" in said[0]
        now[0] += stack.SAME_INTERRUPT_S / 2
        os.kill(os.getpid(), signal.SIGINT)  # the same interrupt, delivered again
        assert presses.count == 1 and len(said) == 1
        now[0] += stack.SAME_INTERRUPT_S
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_engine_events_become_ours():
    urn = "urn:pulumi:dev::gpu-session::pulumi-python:dynamic/gpu_session:GpuInstance::gpu"
    meta = {"op": "create", "urn": urn, "type": "pulumi-python:dynamic/gpu_session:GpuInstance", "provider": ""}
    pre = events.EngineEvent.from_json({"sequence": 1, "timestamp": 0, "resourcePreEvent": {"metadata": meta}})
    assert stack.engine_event(pre) == stack.StackEvent("start", "create", "GpuInstance", "gpu")
    diag = events.EngineEvent.from_json(
        {
            "sequence": 2,
            "timestamp": 0,
            "diagnosticEvent": {"message": "launched …\n", "color": "never", "severity": "info", "urn": urn},
        }
    )
    assert stack.engine_event(diag) == stack.StackEvent("log", name="gpu", message="launched …")
    assert stack.engine_event(events.EngineEvent.from_json({"sequence": 3, "timestamp": 0})) is None
    # Not shown: the engine's debug lines, and the steps of the stack itself and of provider references.
    debug = {"message": "registering resource: ty=…\n", "color": "never", "severity": "debug", "urn": urn}
    assert stack.engine_event(events.EngineEvent.from_json({"sequence": 4, "timestamp": 0, "diagnosticEvent": debug})) is None
    for kind in ("pulumi:pulumi:Stack", "pulumi:providers:pulumi-python"):
        own = {"op": "create", "urn": f"urn:pulumi:dev::gpu-session::{kind}::x", "type": kind, "provider": ""}
        assert (
            stack.engine_event(
                events.EngineEvent.from_json({"sequence": 5, "timestamp": 0, "resourcePreEvent": {"metadata": own}})
            )
            is None
        )
    assert stack.engine_event(
        events.EngineEvent.from_json(
            {"sequence": 6, "timestamp": 0, "resOpFailedEvent": {"metadata": own, "status": 0, "steps": 0}}
        )
    ) == stack.StackEvent("failed", "create", "pulumi-python", "x")  # a failure is always shown


def test_a_provider_watches_the_engine_only_in_its_own_process():
    from gpu_session.providers.lifetime import engine_address

    dynamic = "/venv/lib/python3.11/site-packages/pulumi/dynamic/__main__.py"
    assert engine_address([dynamic, "127.0.0.1:41213"]) == ("127.0.0.1", 41213)
    assert engine_address(["/venv/bin/pytest", "127.0.0.1:41213"]) is None  # a test calling a provider
    assert engine_address([dynamic]) is None and engine_address([dynamic, "tests/x.py::test_y"]) is None


def test_only_a_lock_whose_process_is_gone_is_stale(tmp_path, monkeypatch):
    """kill -9 of a pulumi operation leaves its lock file; a live process's lock, or another machine's, is not ours to take."""
    import json
    import socket
    import subprocess

    monkeypatch.setenv("PULUMI_BACKEND_URL", f"file://{tmp_path}")
    engine = stack.engine("locked")
    locks = tmp_path / ".pulumi" / "locks" / "organization" / "gpu-session" / "locked"
    locks.mkdir(parents=True, exist_ok=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    here = socket.gethostname()
    for name, pid, host in (("dead", gone.pid, here), ("live", os.getpid(), here), ("elsewhere", gone.pid, "another-machine")):
        (locks / f"{name}.json").write_text(json.dumps({"pid": pid, "hostname": host, "username": "root", "timestamp": "now"}))
    assert [lock["pid"] for lock in engine.stale_locks()] == [gone.pid] and engine.stale_locks()[0]["hostname"] == here


def test_doctor_names_every_file_others_could_read(tmp_path):
    from gpu_session.cli.doctor import private_files_problems

    (tmp_path / "stacks" / "dev").mkdir(parents=True, mode=0o700)
    tmp_path.chmod(0o700)
    (tmp_path / "stacks").chmod(0o700)
    (tmp_path / "stacks" / "dev" / "api_key").write_text("x")
    (tmp_path / "stacks" / "dev" / "api_key").chmod(0o600)
    assert private_files_problems(tmp_path) == []
    (tmp_path / "stacks" / "dev" / "known_hosts").write_text("x")
    (tmp_path / "stacks" / "dev" / "known_hosts").chmod(0o644)
    (tmp_path / "stacks").chmod(0o755)
    problems = private_files_problems(tmp_path)
    assert len(problems) == 2 and "known_hosts is 0o644: chmod 600" in problems[1] and "stacks is 0o755: chmod 700" in problems[0]


@pytest.mark.parametrize("name", ["gpu-session-..-gpu", "gpu-session-a/b-gpu", "gpu-session--gpu", "gpu-session-.x-gpu"])
def test_an_instance_name_that_is_no_stack_name_is_nobodys_and_never_a_path(name):
    """A cloud may hold an instance of any name: one that is not a stack name belongs to no stack of
    ours, and a name that is not a stack name never reaches a folder (`sweep` once looked .. up)."""
    from gpu_session.paths import BadStackName
    from gpu_session.stack.automation import workspace
    from gpu_session.stack.names import stack_of_instance

    assert stack_of_instance(name) is None
    with pytest.raises(BadStackName):
        workspace(name.removeprefix("gpu-session-").removesuffix("-gpu"))


@pytest.fixture
def cli_calls(monkeypatch, tmp_path):
    """The `pulumi` CLI on PATH behind a script that writes each command line it is given (never its
    standard input) to a file: the lines written since the last call of the returned function."""
    real, log = stack.pulumi_binary(), tmp_path / "command-lines"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pulumi").write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{real}" "$@"\n')
    (tmp_path / "bin" / "pulumi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    seen = [0]

    def since() -> list[str]:
        lines = log.read_text().splitlines() if log.exists() else []
        new, seen[0] = lines[seen[0] :], len(lines)
        return [line.replace("--non-interactive ", "") for line in new]

    return since


def test_set_config_keeps_secrets_off_command_lines_and_writes_only_what_changed(cli_calls):
    """Every CLI process set_config starts is seen (a script in front of the CLI), not sampled: no
    secret value is ever on a command line. The config round-trips: stale keys go, secrets are
    stored encrypted and read back as secrets, files stay 0600 in 0700 folders; and what already
    holds its value is not written again (each process costs a few hundred ms)."""
    from gpu_session.paths import state_dir

    hf, lam, hf2, runpod = "hf_first-secret", "lambda-secret", "hf_second-secret", "runpod-secret"
    engine = stack.engine("config-trip")
    cli_calls()
    engine.set_config({"model": "a/b", "region": "us-east-1", "hfToken": hf, "lambdaApiKey": lam})
    first = cli_calls()
    # a new stack's config is not read: its file holds none
    assert [line.split(" --")[0] for line in first] == ["config set-all", "config set", "config set"]

    def stored() -> dict[str, tuple[str, bool]]:
        return {k: (v.value, v.secret) for k, v in engine._stack.get_all_config().items() if k.startswith("gpu-session:")}

    assert stored() == {
        "gpu-session:model": ("a/b", False),
        "gpu-session:region": ("us-east-1", False),
        "gpu-session:hfToken": (hf, True),
        "gpu-session:lambdaApiKey": (lam, True),
    }
    cli_calls()
    engine.set_config({"model": "a/b", "region": "us-east-1", "hfToken": hf, "lambdaApiKey": lam})
    assert cli_calls() == ["config --show-secrets --json --stack config-trip"]  # nothing changed: only read

    engine.set_config({"model": "c/d", "hfToken": hf2, "lambdaApiKey": lam})  # region stale, hfToken new
    again = cli_calls()
    assert [line.split(" --")[0] for line in again] == ["config", "config rm-all", "config set-all", "config set"]
    assert "gpu-session:hfToken" in again[-1] and "lambdaApiKey" not in " ".join(again[1:])
    assert stored() == {
        "gpu-session:model": ("c/d", False),
        "gpu-session:hfToken": (hf2, True),
        "gpu-session:lambdaApiKey": (lam, True),
    }

    # A secret's key that holds its value in plain text (set by hand) is stored again, as a secret.
    engine._stack.set_config("gpu-session:runpodApiKey", engine._auto.ConfigValue(runpod))
    cli_calls()  # that command line had it: not set_config's
    engine.set_config({"model": "c/d", "hfToken": hf2, "lambdaApiKey": lam, "runpodApiKey": runpod})
    last = cli_calls()
    assert [line.split(" --")[0] for line in last] == ["config", "config set"]
    assert stored()["gpu-session:runpodApiKey"] == (runpod, True)

    said = "\n".join([*first, *again, *last])
    assert not [s for s in (hf, lam, hf2, runpod) if s in said]  # not on any command line set_config ran
    stack_file = (engine.folder / "Pulumi.config-trip.yaml").read_text()
    assert not [s for s in (hf, lam, hf2, runpod) if s in stack_file] and stack_file.count("secure:") == 3
    for root in (engine.folder, state_dir() / "pulumi"):
        for path in [root, *root.rglob("*")]:
            assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
    engine.remove()


def test_a_new_stack_is_not_asked_for_outputs_and_recover_decrypts_nothing(cli_calls):
    """A stack the engine has just made has no outputs: up's first look asks the CLI nothing. On a
    stack that holds state, up's look is one process that decrypts nothing, and so is recover's
    read of the state, which still finds a killed run's pending create and clears it."""
    import json

    from gpu_session.paths import state_dir

    made = stack.engine("fresh-one")
    cli_calls()
    assert made.outputs() == {} and made.outputs(secrets=False) == {} and cli_calls() == []

    # What `pulumi up` killed while it launched leaves: a pending create in the state.
    checkpoint = state_dir() / "pulumi" / ".pulumi" / "stacks" / "gpu-session" / "fresh-one.json"
    saved = json.loads(checkpoint.read_text())
    urn = "urn:pulumi:fresh-one::gpu-session::pulumi-python:dynamic/gpu_session:GpuInstance::gpu"
    resource = {"urn": urn, "custom": True, "type": "pulumi-python:dynamic/gpu_session:GpuInstance", "inputs": {}}
    saved["checkpoint"]["latest"]["pending_operations"] = [{"resource": resource, "type": "creating"}]
    checkpoint.write_text(json.dumps(saved))

    engine, said = stack.engine("fresh-one"), []
    cli_calls()
    assert engine.outputs(secrets=False) == {} and cli_calls() == ["stack output --json --stack fresh-one"]
    assert [(r["type"], r["pending"]) for r in engine.recover(said.append)] == [("GpuInstance", "creating")]
    ran = cli_calls()
    assert ran[0] == "stack export --stack fresh-one" and ran[1].startswith("refresh ") and "--clear-pending-creates" in ran[1]
    assert not [line for line in ran if "--show-secrets" in line]
    assert [e.message for e in said] == ["an interrupted operation left GpuInstance gpu half-created: clearing it from the state"]
    assert engine.resources() == [] and engine.recover() == []
    engine.remove(force=True)
