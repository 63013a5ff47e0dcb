"""A cache volume across sessions, as a person uses it (real processes, the real Pulumi engine,
real hosts with the volume mounted), on both clouds of the simulator: `cache create`, two sessions
of the same model in a row (the second takes the engine and the weights from the volume: its
converge says so), `down` of each leaving no instance and nothing of the session on the volume
(its canaries and its server key are searched for there), the cache intact after each, and
`cache rm` leaving nothing at the cloud or here."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_session import alive, events, invoke


def session_dir(stack: str) -> Path:
    return Path(os.environ["XDG_STATE_HOME"]) / "gpu-session" / "stacks" / stack


def volumes(sim, cloud: str) -> list[dict]:
    return [v for v in sim.volumes() if v["cloud"] == cloud]


def found_on(folder: Path, needles: list[str]) -> str:
    """The files under `folder` that hold any of `needles` (grep -rlF, binary files included)."""
    patterns = "\n".join(needles)
    done = subprocess.run(["grep", "-rlF", "-e", patterns, str(folder)], capture_output=True, text=True)
    assert done.returncode in (0, 1), done.stderr
    return done.stdout


def session(sim, cloud: str, backend: str, stack: str) -> dict:
    """One session on the cache: up, a chat, down. What the converge said of the cache, and of its phases."""
    up = invoke("up", "--model", "gpu-session/tiny-chat", "--cloud", cloud, "--backend", backend, "--hours", "1",
                "--stack", stack, "--yes", "--json")  # fmt: skip
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    said = [e["message"] for e in events(up.stdout) if e["event"] == "say"]
    assert said[0].startswith(f"plan: {cloud}: ") and said[1].startswith(f"  cache {cloud} "), said[:2]  # its own line
    configured = json.loads((session_dir(stack) / "configured.json").read_text())
    # What the up's phases said when each ended (the view shows it beside the phase): {phase: note}
    configured["notes"] = {
        e["phase"]: e.get("note", "") for e in events(up.stdout) if e["event"] == "progress" and e["state"] == "done"
    }
    chat = invoke("chat", "--stack", stack, "--prompt", "Say hello", "--max-tokens", "8")
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr[-2000:]
    secrets = [json.loads((session_dir(stack) / "canaries.json").read_text())["canaries"]][0]
    secrets.append((session_dir(stack) / "api_key").read_text().strip())

    down = invoke("down", "--stack", stack, "--json")
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    assert not alive(sim, stack)
    result = [e for e in events(down.stdout) if e["event"] == "summary"][-1]
    kept = result["receipt"]["cache"]["kept"]
    assert kept and all(k["why"] for k in kept), result["receipt"]
    assert any(c["cloud"] == cloud for c in result["caches"]), result  # down reports the cache that remains
    [volume] = volumes(sim, cloud)
    # Nothing of the session on the volume: not its canaries, not the server's key.
    assert found_on(sim.volume_dir(volume["id"]), secrets) == ""
    return configured


@pytest.mark.timeout(1500)  # four ups and downs
# Lambda's sessions configure (and scrub) with Mitogen's strategy (README: Faster configure with
# Mitogen): the same phases, notes and receipts, through sudo. Both serve with transformers: what the
# volume keeps is the engine's venv from its lock and the Hub's cache, the same path whichever
# engine (vLLM's CPU build would add two minutes of starts; `invoke bench --cache` measures it).
@pytest.mark.parametrize(
    "cloud, backend, strategy", [("lambda", "transformers", "mitogen_linear"), ("runpod", "transformers", "linear")]
)
def test_a_cache_makes_the_second_session_skip_install_and_download_and_keeps_nothing_of_either(
    sim, sim_env, wheelhouse, monkeypatch, cloud, backend, strategy
):
    monkeypatch.setenv("ANSIBLE_STRATEGY", strategy)
    dry = invoke("up", "--model", "gpu-session/tiny-chat", "--cloud", cloud, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    # 50 GB: the roles want room for an engine (20 GiB, as on a GPU) and the weights before they write.
    region = json.loads(dry.stdout)["region"] or "EU-RO-1"  # RunPod places pods itself: a data center of its own
    created = invoke("cache.create", "--cloud", cloud, "--region", region, "--size", "50")
    assert created.returncode == 0, created.stdout[-3000:] + created.stderr[-3000:]
    again = invoke("cache.create", "--cloud", cloud, "--region", region, "--size", "50")
    assert again.returncode == 0 and len(volumes(sim, cloud)) == 1, again.stderr[-2000:]  # adopted, not made twice
    stack = f"cache-{cloud}"
    try:
        first = session(sim, cloud, backend, stack)
        assert first["cache"]["engine"] == "installed" and first["cache"]["weights"] == "downloaded", first
        assert first["notes"]["engine"] == first["notes"]["download"] == "", first["notes"]
        assert first["strategy"] == strategy, first
        second = session(sim, cloud, backend, stack)
        # The second session took both from the volume: no install, no download.
        assert second["cache"]["engine"] == "reused" and second["cache"]["weights"] == "reused", second
        assert second["phases"]["download_wait"] == 0, second
        # Its slowest tasks that added to the wall clock: none of those run while the engine loaded.
        loaded = {"Ask for one token", "Write the lease", "Plant the session's canaries"}
        assert second["slowest_outside_load"] and not loaded & set(second["slowest_outside_load"]), second
        # and its phases say so, as the person running `up` sees them
        reused = "reused from the cache volume"
        assert second["notes"]["engine"] == second["notes"]["download"] == reused, second["notes"]

        listed = invoke("cache.list", "--json")
        assert listed.returncode == 0, listed.stderr
        [row] = [r for r in json.loads(listed.stdout) if r["cloud"] == cloud]
        assert row["region"] == region and row["monthly_usd"] > 0 and not row["in_use_by"], row
        # Lambda bills the bytes held, and says how many; RunPod bills the size, and says nothing of use.
        assert row["bytes_used"] > 0 if cloud == "lambda" else row["size_gb"] == 50, row
    finally:
        # A session a failure left up holds the cache (rm refuses it), and a cache left behind would be
        # planned into the other tests' sessions on this simulator: both go, whatever happened.
        invoke("down", "--stack", stack)
        removed = invoke("cache.rm", "--cloud", cloud, "--region", region, "--yes")
    assert removed.returncode == 0, removed.stdout[-3000:] + removed.stderr[-3000:]
    assert volumes(sim, cloud) == []
    listed = invoke("cache.list", "--json")
    assert listed.returncode == 0 and [r for r in json.loads(listed.stdout) if r["cloud"] == cloud] == []
