"""The README's "With the Pulumi CLI" steps, typed as written with the real `pulumi` CLI against the
simulator, and a bare `pulumi up` killed while its instance boots."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from gpu_session.stack.automation import pulumi_binary

ROOT = Path(__file__).resolve().parents[2]


def readme_steps() -> list[str]:
    """The commands of the README's block under "### With the Pulumi CLI", comments dropped."""
    text = (ROOT / "README.md").read_text().split("### With the Pulumi CLI", 1)[1]
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


@pytest.fixture
def project(tmp_path, sim, sim_env, monkeypatch):
    """A shell as the README's reader has it: this checkout's project (Pulumi.yaml, infra/) as the
    working folder, the simulator's endpoints exported, the CLI where the installer put it."""
    folder = tmp_path / "checkout"
    folder.mkdir()
    for name in ("Pulumi.yaml", "infra"):  # the stack's config file lands here, not in the real checkout
        (folder / name).symlink_to(ROOT / name)
    monkeypatch.setenv("PATH", f"{pulumi_binary().parent}:{os.environ['PATH']}")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # `pulumi login --local` is file://~ of the real user, whatever HOME says: the backend variable,
    # which every later command takes over the login, keeps the stacks in the test's folder.
    monkeypatch.setenv("PULUMI_BACKEND_URL", f"file://{tmp_path / 'backend'}")
    (tmp_path / "backend").mkdir()
    monkeypatch.setenv("PULUMI_CONFIG_PASSPHRASE", "the passphrase typed at stack init")
    for var in ("LAMBDA_API_KEY", "RUNPOD_API_KEY", "HF_TOKEN"):  # the keys go in through `config set --secret`
        monkeypatch.delenv(var)
    return folder


def shell(line: str, cwd: Path, stdin: str = "", timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "-c", line], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def live(sim, stack: str) -> list[dict]:
    return [
        i for i in sim.instances() if i["name"] == f"gpu-session-{stack}-gpu" and i["status"] not in ("terminated", "TERMINATED")
    ]


def test_the_readme_cli_steps_bring_the_model_up_and_leave_nothing(project, sim, wheelhouse):
    steps = readme_steps()
    assert steps[0].startswith("export PATH=") and steps[1] == "pulumi login --local" and steps[-1] == "pulumi destroy"
    answers = {"lambdaApiKey": sim.lambda_key, "hfToken": sim.hf_token}  # what the reader types at the prompts
    said = {}
    for step in steps:
        line = step.replace("meta-llama/Llama-3.1-8B-Instruct", "gpu-session/tiny-chat")  # the simulator's model
        if line in ("pulumi up", "pulumi destroy"):
            line += " --yes"  # the reader answers the prompt
        if line == "pulumi stack init cli":  # the simulator's tiny model starts in seconds on transformers
            line += " && pulumi config set backend transformers"
        secret = re.fullmatch(r"pulumi config set --secret (\w+)", line)
        said[step] = shell(line, project, stdin=answers[secret.group(1)] + "\n" if secret else "").stdout
        if line.startswith("pulumi up"):
            [inst] = live(sim, "cli")
            session = Path(os.environ["XDG_STATE_HOME"]) / "gpu-session" / "stacks" / "cli"
            api_key = (session / "api_key").read_text().strip()
            # The model answers on the host, behind its key, over the session's pinned SSH.
            ssh = ["ssh", "-i", str(session / "id_ed25519"), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                   "-o", f"UserKnownHostsFile={session / 'known_hosts'}", "-p", str(inst["ssh_port"]), f"ubuntu@{inst['address']}",
                   f"curl -s -H 'Authorization: Bearer {api_key}' http://127.0.0.1:8000/v1/models"]  # fmt: skip
            models = json.loads(subprocess.run(ssh, capture_output=True, text=True, timeout=60, check=True).stdout)
            assert "gpu-session/tiny-chat" in [m["id"] for m in models["data"]]
    assert said["pulumi stack output host"].strip() == inst["address"]
    assert not live(sim, "cli") and not [k for k in sim.ssh_keys() if k["name"].startswith("gpu-session-cli-")]
    config = (project / "Pulumi.cli.yaml").read_text()
    assert sim.lambda_key not in config and sim.hf_token not in config and "secure:" in config


def test_a_killed_pulumi_up_leaves_a_pending_create_that_the_next_up_adopts(project, sim, monkeypatch):
    monkeypatch.setenv("LAMBDA_API_KEY", sim.lambda_key)
    shell("pulumi login --local && pulumi stack init killed && pulumi config set model gpu-session/tiny-chat"
          " && pulumi config set configure false", project)  # fmt: skip
    boot_delay, sim.world.config.boot_delay = sim.world.config.boot_delay, 10  # up is killed while it waits for SSH
    try:
        up = subprocess.Popen(["pulumi", "up", "--yes"], cwd=project, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while not live(sim, "killed") and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)
        os.killpg(up.pid, signal.SIGKILL)
        up.wait()
    finally:
        sim.world.config.boot_delay = boot_delay
    [launched] = live(sim, "killed")
    state = json.loads(shell("pulumi stack export", project).stdout)["deployment"]
    assert [op["type"] for op in state.get("pending_operations", [])] == ["creating"]
    assert "GpuInstance" not in [r["type"].rsplit(":", 1)[-1] for r in state.get("resources", [])]

    # As the README says: unlock, up again (the instance is adopted by its name), tidy the record.
    locked = subprocess.run(["pulumi", "up", "--yes"], cwd=project, capture_output=True, text=True)
    assert locked.returncode != 0 and "pulumi cancel" in locked.stdout + locked.stderr
    shell("pulumi cancel --yes", project)
    adopted = shell("pulumi up --yes && pulumi stack output instance_id", project)
    assert adopted.stdout.strip().splitlines()[-1] == launched["id"] and [i["id"] for i in live(sim, "killed")] == [
        launched["id"]
    ]
    shell("pulumi refresh --clear-pending-creates --yes", project)
    assert not json.loads(shell("pulumi stack export", project).stdout)["deployment"].get("pending_operations")
    shell("pulumi destroy --yes", project)
    assert not live(sim, "killed")
