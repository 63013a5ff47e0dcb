"""The real program (infra/__main__.py) on the real engine (the `pulumi` CLI through the Automation
API, gpu_session.stack.PulumiEngine) with a file backend: the dynamic providers against the
simulator, Configure's playbooks (site on create, scrub on delete), real hosts, real Ansible."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import FAST_RETRY

from gpu_session.clouds import LaunchSpec
from gpu_session.clouds.lambda_cloud import LambdaCloud
from gpu_session.local.tunnel import free_port
from gpu_session.stack.automation import PulumiEngine, StackError, StackEvent


@pytest.fixture
def stack(request, sim, sim_env):
    """A stack unique to the test; whatever a failing test leaves in the simulator is ended after it."""
    name = "p-" + request.node.name.removeprefix("test_").replace("_", "-")[:30]
    engine = PulumiEngine(name)
    engine.events: list[StackEvent] = []
    yield engine
    for inst in list(sim.world.instances.values()):
        if inst.name.startswith(f"gpu-session-{name}-") and inst.status not in ("terminating", "terminated"):
            sim.world.terminate(inst)


def record(engine):
    return engine.events.append


def cli(engine: PulumiEngine, *args: str) -> str:
    """The `pulumi` CLI on the engine's stack, in its workspace, with its environment."""
    from gpu_session.stack.automation import pulumi_binary

    done = subprocess.run([str(pulumi_binary()), *args, "--stack", engine.stack], cwd=engine.folder,
                          env={**os.environ, **engine._env}, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def types(engine: PulumiEngine) -> list[str]:
    return [r["type"] for r in engine.resources()]


def live(sim, stack_name: str) -> list[dict]:
    return [
        i
        for i in sim.instances()
        if i["name"] == f"gpu-session-{stack_name}-gpu" and i["status"] not in ("terminated", "TERMINATED")
    ]


def our_keys(sim, stack_name: str) -> list[dict]:
    return [k for k in sim.ssh_keys() if k["name"].startswith(f"gpu-session-{stack_name}-")]


def ops(engine) -> list[tuple[str, str, str]]:
    """(kind, op, type) of each step on our resources (the stack and the provider reference left out)."""
    return [
        (e.kind, e.op, e.type) for e in engine.events if e.kind in ("start", "done") and e.type not in ("Stack", "pulumi-python")
    ]


def tunnel(outputs: dict, local_port: int) -> subprocess.Popen:
    """ssh -L with the session's key, refusing any host key but the pinned one."""
    d = outputs["session_dir"]
    proc = subprocess.Popen([
        "ssh", "-N", "-i", f"{d}/id_ed25519", "-p", str(outputs["port"]), "-L", f"{local_port}:127.0.0.1:8000",
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={d}/known_hosts", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR",
        f"{outputs['user']}@{outputs['host']}",
    ], stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            socket.create_connection(("127.0.0.1", local_port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the tunnel did not open")


def ask(port: int, path: str, key: str | None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}


@pytest.mark.parametrize("cloud", ["lambda", "runpod"])
def test_up_serves_the_model_and_destroy_scrubs_before_terminating(stack, sim, cloud, wheelhouse, monkeypatch):
    # Credentials only as secret config: the providers must get them through configure().
    for var in ("LAMBDA_API_KEY", "RUNPOD_API_KEY", "HF_TOKEN"):
        monkeypatch.delenv(var)
    with ProcessArguments() as arguments:  # every process's command line while the config is set and up runs
        stack.set_config({
            "model": "gpu-session/tiny-chat", "cloud": cloud, "backend": "transformers", "hours": "1",
            "lambdaApiKey": sim.lambda_key, "runpodApiKey": sim.runpod_key, "hfToken": sim.hf_token,
        })  # fmt: skip
        outputs = stack.up(record(stack))
    events_of_up = list(stack.events)

    assert [o for o in ops(stack) if o[0] == "done"] == [
        *([("done", "create", "LambdaSshKey")] if cloud == "lambda" else []),
        ("done", "create", "GpuInstance"),
        ("done", "create", "Configure"),
    ]
    assert any("pulumi-language-python-exec" in a for a in arguments.seen) and any(
        "gpu_session.host.converge" in a for a in arguments.seen
    )
    session = Path(outputs["session_dir"])
    assert outputs["cloud"] == cloud and outputs["model"] == outputs["served_model_name"] == "gpu-session/tiny-chat"
    assert [i["id"] for i in live(sim, stack.stack)] == [outputs["instance_id"]]
    assert outputs["price_per_hour"] > 0 and outputs["lease_expires_at"]
    if cloud == "lambda":  # the host key we made went in through cloud-init: pinned before the first connection
        host_key = (session / "host_ed25519_key.pub").read_text().split()[1]
        assert host_key in (session / "known_hosts").read_text()

    # Reachable only through SSH with the session's key and pinned host key; the model server wants its key.
    api_key = (session / "api_key").read_text().strip()
    port = free_port()
    forward = tunnel(outputs, port)
    try:
        assert ask(port, "/v1/models", None)[0] == 401
        status, models = ask(port, "/v1/models", api_key)
        assert status == 200 and "gpu-session/tiny-chat" in [m["id"] for m in models["data"]]
    finally:
        forward.terminate()

    # Nothing changed: nothing happens.
    stack.events.clear()
    stack.up(record(stack))
    assert {o[1] for o in ops(stack)} == {"same"}, [e.message for e in stack.events if e.message.startswith("changed")]

    # No secret in the state (as exported, and the backend's files), the stack's config, the engine's
    # logs, the provider pickles (decrypted) or the outputs; the events and arguments are checked below.
    decrypted = stack.export()  # as the Automation API exports it: with --show-secrets
    pickles = [base64.b64decode(plain(r["inputs"]["__provider"])).decode("latin-1") for r in decrypted["resources"]
               if "__provider" in r.get("inputs", {})]  # fmt: skip
    assert sim.hf_token in json.dumps(decrypted)  # the export can show it: the scans below can find it
    files = [f for root in (Path(os.environ["XDG_STATE_HOME"]) / "gpu-session" / "pulumi", stack.folder,
                            Path(os.environ["PULUMI_HOME"])) for f in root.rglob("*") if f.is_file()]  # fmt: skip
    assert any(f.name == f"{stack.stack}.json" for f in files) and any(f.suffix == ".log" for f in files)
    produced = [
        cli(stack, "stack", "export"),
        *(f.read_text(errors="replace") for f in files),
        *pickles,
        json.dumps(stack.outputs()),
    ]

    stack.events.clear()
    stack.destroy(record(stack))
    deletes = [o[2] for o in ops(stack) if o[:2] == ("done", "delete")]
    assert deletes == ["Configure", "GpuInstance", *(["LambdaSshKey"] if cloud == "lambda" else [])]
    receipt = json.loads((session / "scrub-receipt.json").read_text())
    ended = [t for t in sim.world.snapshot()["terminations"] if t["id"] == outputs["instance_id"]]
    assert receipt["instance_id"] == outputs["instance_id"] and ended and receipt["scrubbed_at"] < ended[0]["t"]
    assert not live(sim, stack.stack) and not our_keys(sim, stack.stack) and stack.resources() == []

    planted = {
        "lambda key": sim.lambda_key, "runpod key": sim.runpod_key, "hf token": sim.hf_token, "api key": api_key,
        "session private key": (session / "id_ed25519").read_text().splitlines()[1],
        "host private key": (session / "host_ed25519_key").read_text().splitlines()[1],
    }  # fmt: skip
    produced = "\n".join([*produced, *(repr(e) for e in [*events_of_up, *stack.events]), *arguments.seen])
    assert pickles and [what for what, secret in planted.items() if secret in produced] == []


def plain(value):
    """A value of `pulumi stack export --show-secrets`: a secret comes as {<sig>: …, "plaintext": JSON}."""
    return json.loads(value["plaintext"]) if isinstance(value, dict) and "plaintext" in value else value


class ProcessArguments:
    """Every command line on this machine, sampled while the block runs (a thread, every 20 ms)."""

    def __enter__(self):
        self.seen: set[str] = set()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.02):
                for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                    try:
                        self.seen.add(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
                    except OSError:
                        pass  # the process ended

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def lambda_cloud(sim) -> LambdaCloud:
    env = sim.env()
    return LambdaCloud(api_key=env["LAMBDA_API_KEY"], base_url=env["LAMBDA_API_BASE"], retry=FAST_RETRY, poll_interval=0.05)


def test_refresh_drops_an_instance_terminated_outside_pulumi(stack, sim):
    stack.set_config({"model": "gpu-session/tiny-chat", "configure": "false"})
    first = stack.up()
    lambda_cloud(sim).terminate_and_wait(first["instance_id"], time.monotonic() + 30)  # "the console"

    stack.refresh(record(stack))
    assert ("done", "delete", "GpuInstance") in ops(stack)
    assert types(stack) == ["LambdaSshKey"]

    second = stack.up()  # a new machine, not a stale record
    assert second["instance_id"] != first["instance_id"] and [i["id"] for i in live(sim, stack.stack)] == [second["instance_id"]]
    stack.destroy()
    assert not live(sim, stack.stack) and not our_keys(sim, stack.stack)


def test_a_create_that_fails_after_launch_leaves_no_instance(stack, sim):
    stack.set_config({"model": "gpu-session/tiny-chat", "configure": "false"})
    killed = []

    def kill_on_boot():  # the machine dies while it boots
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            for inst in list(sim.world.instances.values()):
                if inst.name == f"gpu-session-{stack.stack}-gpu":
                    sim.kill_instance(inst.id)
                    killed.append(inst.id)
            time.sleep(0.02)

    threading.Thread(target=kill_on_boot, daemon=True).start()
    with pytest.raises(StackError, match=r"NotReady: lambda instance \w+ is terminated instead of starting"):
        stack.up(record(stack))
    assert killed and not live(sim, stack.stack)
    assert "GpuInstance" not in types(stack)
    stack.destroy()
    assert stack.resources() == [] and not our_keys(sim, stack.stack)


def test_a_second_create_adopts_the_instance_a_crashed_one_launched(stack, sim, keypair):
    """The machine an interrupted `up` launched (the record never written) is adopted by the next
    `up`, never launched twice."""
    cloud = lambda_cloud(sim)
    stack.set_config({"model": "gpu-session/tiny-chat", "configure": "false", "gpu": "gpu_1x_a10"})
    key = cloud.register_ssh_key(f"gpu-session-{stack.stack}-crashed", keypair.public)
    orphan = cloud.launch(LaunchSpec(name=f"gpu-session-{stack.stack}-gpu", instance_type="gpu_1x_a10", ssh_key_name=key.name))

    outputs = stack.up()
    assert outputs["instance_id"] == orphan and [i["id"] for i in live(sim, stack.stack)] == [orphan]
    stack.destroy()
    cloud.delete_ssh_key(key.id)
    assert not live(sim, stack.stack)


@pytest.mark.parametrize(
    "config, says",
    [
        (
            {"model": "gpu-session/tiny-chat", "gpuCont": "2"},
            "gpu-session:gpuCont is not a setting; did you mean gpu-session:gpuCount?",
        ),
        ({"model": "gpu-session/tiny-chat", "diskGb": "lots"}, "gpu-session:diskGb must be a whole number of at least 10"),
        ({"model": "tiny-chat; rm -rf /"}, "gpu-session:model must be a Hugging Face model id"),
        ({"model": "nobody/no-such-model"}, "nobody/no-such-model is not on the Hub"),
        ({"model": "meta-llama/Llama-3.1-70B-Instruct"}, "needs 134.0 GiB of GPU memory, more than any 1-GPU offer gives"),
        # The preflight runs in the program too: `pulumi up` alone launches nothing that cannot work.
        ({"model": "lmsys/vicuna-13b-v1.5"}, "has no chat template"),
        ({"model": "meta-llama/Llama-3.1-70B-Instruct", "gpuCount": "2", "diskGb": "100"}, "gpu-session:diskGb 100 is too small"),
        ({"model": "gpu-session/tiny-chat", "context": "4096"}, "served with at most 2,048 tokens of context"),
        (
            {"model": "meta-llama/Llama-3.1-70B-Instruct", "gpuCount": "8", "maxPricePerHour": "1"},
            "above the price cap of $1.00/h",
        ),
    ],
)
def test_bad_config_is_refused_before_anything_is_launched(stack, sim, config, says):
    launched = len(sim.world.instances)
    with pytest.raises(StackError) as e:
        stack.set_config(config)
        stack.up()
    assert says in str(e.value)
    assert len(sim.world.instances) == launched
    if "Llama-3.1-70B" not in config["model"]:  # refused by the program, before any resource
        assert not our_keys(sim, stack.stack)
    stack.destroy()
    assert not our_keys(sim, stack.stack) and stack.resources() == []


def test_one_ctrl_c_lets_the_launch_finish_and_records_it(stack, sim, sim_env):
    """Ctrl-C while the instance boots (the whole foreground group gets SIGINT, as a terminal sends
    it): the create in flight finishes and is recorded, nothing after it starts, and the state has
    nothing pending: `destroy` alone then ends the machine."""
    stack.set_config({"model": "gpu-session/tiny-chat"})
    child = subprocess.Popen(
        [sys.executable, "-c", f"from gpu_session.stack.automation import engine; engine({stack.stack!r}).up(print)"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not live(sim, stack.stack) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGINT)
    said, _ = child.communicate(timeout=300)
    assert child.returncode != 0 and "StackCancelled" in said, said[-3000:]
    [launched] = live(sim, stack.stack)
    assert [(r["type"], r["id"], r["pending"]) for r in stack.resources()] == [
        ("LambdaSshKey", our_keys(sim, stack.stack)[0]["id"], ""),
        ("GpuInstance", launched["id"], ""),
    ]  # recorded, Configure never started, nothing pending
    stack.destroy()
    assert not live(sim, stack.stack) and stack.resources() == []
