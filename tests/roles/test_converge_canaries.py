"""What converge (the stack's Configure resource) gives the playbooks of the instance's canaries:
site.yml gets them as gpu_session_canaries, made once per instance and kept 0600 in the stack's
folder; scrub.yml gets the same as scrub_canaries, and none for a stack from before canaries or for
another instance. (Planting and proving them gone on a host: test_model_server.py.)"""

from __future__ import annotations

import json

import pytest

from gpu_session.host import converge
from gpu_session.host.ansible import RunResult
from gpu_session.host.ssh import SessionKeys


@pytest.fixture
def runs(monkeypatch, tmp_path):
    """converge with its playbooks recorded rather than run, on a stack folder of its own."""
    seen: list[dict] = []

    def run(target, **kwargs):
        seen.append(kwargs)
        return RunResult(ok=True, changed=0, facts={"scrub_receipt": {"ok": True}})

    monkeypatch.setattr(converge, "run", run)
    monkeypatch.setattr(converge, "session_keys", lambda stack: SessionKeys(tmp_path))
    monkeypatch.setattr(converge, "pin_host", lambda settings, keys: None)
    monkeypatch.setattr(converge, "ssh_banner", lambda *a, **k: "SSH-2.0-OpenSSH")
    return seen


def settings(instance_id: str) -> converge.HostSettings:
    return converge.HostSettings(
        stack="canaries", cloud="lambda", instance_id=instance_id, host="192.0.2.1", port=22, user="ubuntu",
        model="gpu-session/tiny-chat",
    )  # fmt: skip


def test_site_and_scrub_get_the_same_canaries_of_the_instance(runs, tmp_path):
    converge.site(settings("i-1"), {})
    planted = runs[-1]["extravars"]["gpu_session_canaries"]
    assert len(planted) == converge.CANARY_COUNT and all(c.startswith("gpu-session-canary-") and len(c) == 35 for c in planted)
    saved = tmp_path / converge.CANARIES
    assert json.loads(saved.read_text()) == {"instance_id": "i-1", "canaries": planted}
    assert oct(saved.stat().st_mode & 0o777) == "0o600"
    converge.site(settings("i-1"), {})  # configured again: the same ones
    assert runs[-1]["extravars"]["gpu_session_canaries"] == planted
    converge.scrub(settings("i-1"), {})
    assert runs[-1]["playbook"] == "scrub.yml" and runs[-1]["extravars"] == {"scrub_canaries": planted}


def test_a_new_instance_gets_new_canaries_and_scrub_looks_only_for_its_own(runs, tmp_path):
    converge.site(settings("i-1"), {})
    first = runs[-1]["extravars"]["gpu_session_canaries"]
    converge.site(settings("i-2"), {})
    second = runs[-1]["extravars"]["gpu_session_canaries"]
    assert not set(first) & set(second)
    converge.scrub(settings("i-1"), {})  # none of i-2's were planted on i-1
    assert runs[-1]["extravars"] is None


def test_a_stack_from_before_canaries_is_scrubbed_as_before(runs, tmp_path):
    converge.scrub(settings("i-1"), {})
    assert runs[-1]["extravars"] is None and not (tmp_path / converge.CANARIES).exists()
    (tmp_path / converge.CANARIES).write_text("not json")
    converge.scrub(settings("i-1"), {})
    assert runs[-1]["extravars"] is None


def test_the_cache_volume_reaches_site_and_scrub_and_configured_json_says_what_it_gave(runs, tmp_path, monkeypatch):
    env = {"GPU_SESSION_CACHE_ROOT": "/workspace", "GPU_SESSION_CACHE_SIZE_GB": "50", "GPU_SESSION_CACHE_WEIGHTS": "false"}
    base = {f"GPU_SESSION_{k}": v for k, v in (("STACK", "s"), ("CLOUD", "runpod"), ("INSTANCE_ID", "i-1"), ("HOST", "h"), ("PORT", "22"), ("USER", "root"))}  # fmt: skip
    got = converge.HostSettings.from_env(base | env)
    assert (got.cache_root, got.cache_size_gb, got.cache_weights) == ("/workspace", 50, False)
    plain = converge.HostSettings.from_env(base)
    assert (plain.cache_root, plain.cache_size_gb, plain.cache_weights) == ("", 0, True)
    fact = {"root": "/workspace", "engine": "reused", "weights": "not cached (gated)"}

    def run(target, **kw):  # the role publishes the fact only with a cache root
        runs.append(kw)
        return RunResult(
            ok=True,
            changed=0,
            facts={"model_server_cache": fact} if (kw["extravars"] or {}).get("gpu_session_cache_root") else {},
        )

    monkeypatch.setattr(converge, "run", run)
    converge.site(got, {})
    assert {k: runs[-1]["extravars"][k] for k in ("gpu_session_cache_root", "gpu_session_cache_size_gb", "model_server_cache_weights")} == {
        "gpu_session_cache_root": "/workspace", "gpu_session_cache_size_gb": 50, "model_server_cache_weights": False}  # fmt: skip
    assert json.loads((tmp_path / "configured.json").read_text())["cache"] == fact
    converge.scrub(got, {})
    assert runs[-1]["extravars"]["gpu_session_cache_root"] == "/workspace"
    converge.site(plain, {})
    assert "cache" not in json.loads((tmp_path / "configured.json").read_text())
