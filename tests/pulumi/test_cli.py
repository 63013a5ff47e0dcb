"""The same stack through the real Pulumi CLI and the Automation API (gpu_session.stack.PulumiEngine),
on a local file backend, against the simulator. Skipped where the CLI is absent: no package
registry this project's CI can reach ships it (https://www.pulumi.com/docs/iac/download-install/)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gpu_session.stack import PulumiEngine, PulumiMissing, StackEvent, pulumi_binary


def _has_cli() -> bool:
    try:
        pulumi_binary()
        return True
    except PulumiMissing:
        return False


pytestmark = pytest.mark.skipif(not _has_cli(), reason="the pulumi CLI is not installed: curl -fsSL https://get.pulumi.com | sh")


@pytest.fixture
def cli_stack(request, sim, sim_env, tmp_path, monkeypatch):
    monkeypatch.setenv("PULUMI_BACKEND_URL", f"file://{tmp_path / 'backend'}")
    (tmp_path / "backend").mkdir()
    name = "cli-" + request.node.name.removeprefix("test_").replace("_", "-")[:30]
    engine = PulumiEngine(name)
    yield engine
    for inst in list(sim.world.instances.values()):
        if inst.name.startswith(f"gpu-session-{name}-") and inst.status not in ("terminating", "terminated"):
            sim.world.terminate(inst)


def live(sim, stack_name: str) -> list[dict]:
    return [
        i
        for i in sim.instances()
        if i["name"] == f"gpu-session-{stack_name}-gpu" and i["status"] not in ("terminated", "TERMINATED")
    ]


def test_up_refresh_destroy(cli_stack, sim):
    cli_stack.set_config({"model": "gpu-session/tiny-chat", "configure": "false"})
    outputs = cli_stack.up()
    assert [i["id"] for i in live(sim, cli_stack.stack)] == [outputs["instance_id"]]

    sim.world.terminate(sim.world.instances[outputs["instance_id"]])  # out of band
    time.sleep(1)
    cli_stack.refresh()
    again = cli_stack.up()
    assert again["instance_id"] != outputs["instance_id"]

    cli_stack.destroy()
    assert not live(sim, cli_stack.stack)
    assert not [k for k in sim.ssh_keys() if k["name"].startswith(f"gpu-session-{cli_stack.stack}-")]


def test_destroy_scrubs_before_it_terminates(cli_stack, sim, wheelhouse):
    cli_stack.set_config({"model": "gpu-session/tiny-chat", "backend": "transformers", "hfToken": sim.hf_token})
    outputs = cli_stack.up()
    seen: list[StackEvent] = []
    cli_stack.destroy(seen.append)
    order = [(e.kind, e.type) for e in seen if e.kind == "done"]
    assert order.index(("done", "Command")) < order.index(("done", "GpuInstance"))
    receipt = json.loads((Path(outputs["session_dir"]) / "scrub-receipt.json").read_text())
    assert receipt["instance_id"] == outputs["instance_id"] and not live(sim, cli_stack.stack)
