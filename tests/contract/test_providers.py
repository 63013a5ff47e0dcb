"""The Pulumi dynamic providers, called as the engine calls them, against the simulator: check names
the bad key, create launches (or adopts) and waits for SSH, a failure after launch leaves nothing,
read drops an instance ended outside Pulumi, delete treats "already gone" as success."""

from __future__ import annotations

import pickle

import pytest
from conftest import own_instances

from gpu_session.providers import GpuInstanceProvider, LambdaSshKeyProvider
from gpu_session.providers.instance import OUTPUTS


def runpod_props(name: str, keypair, **more) -> dict:
    return {"cloud": "runpod", "name": name, "gpu_type": "NVIDIA GeForce RTX 4090", "gpu_count": 1,
            "ssh_public_key": keypair.public, "ready_timeout_s": 60, **dict.fromkeys(OUTPUTS), **more}  # fmt: skip


def failures(result) -> dict[str, str]:
    return {f.property: f.reason for f in result.failures}


def test_check_names_each_bad_input():
    p = GpuInstanceProvider()
    bad = failures(p.check({}, {"cloud": "aws", "name": "has space", "gpu_count": 1.5, "disk_gb": "big"}))
    assert set(bad) == {"cloud", "name", "gpu_type", "gpu_count", "disk_gb"} and "lambda, runpod" in bad["cloud"]
    assert set(failures(p.check({}, {"cloud": "lambda", "name": "ok-1", "gpu_type": "gpu_1x_a10"}))) == {"ssh_key_name"}
    assert failures(LambdaSshKeyProvider().check({}, {"name": "k", "public_key": "not a key"})).keys() == {"public_key"}


def test_diff_replaces_on_the_machine_and_ignores_the_provider_and_an_unasked_region():
    p = GpuInstanceProvider()
    olds = {"cloud": "runpod", "name": "n", "gpu_type": "A", "region": "EU-RO-1", "ready_timeout_s": 60, "__provider": "x"}
    assert not p.diff("i", olds, {**olds, "region": None, "__provider": "y"}).changes
    d = p.diff("i", olds, {**olds, "gpu_type": "B"})
    assert d.changes and d.replaces == ["gpu_type"] and d.delete_before_replace
    d = p.diff("i", olds, {**olds, "ready_timeout_s": 120})
    assert d.changes and d.replaces == []


def test_the_provider_pickles_without_credentials(sim_env):
    p = GpuInstanceProvider()
    blob = pickle.dumps(p)
    assert sim_env["RUNPOD_API_KEY"].encode() not in blob and len(blob) < 200


def test_create_waits_for_ssh_a_second_create_adopts_and_delete_ends_it(sim, sim_env, keypair, name):
    p = GpuInstanceProvider()
    first = p.create(runpod_props(name, keypair))
    outs = first.outs
    assert outs["instance_id"] == first.id and outs["user"] == "root" and outs["port"] and outs["host"]
    assert outs["gpu_name"] and outs["price_per_hour"] > 0 and outs["launched_at"] and outs["name"] == name
    again = p.create(runpod_props(name, keypair))
    assert again.id == first.id and len([i for i in own_instances(sim, name) if i["status"] != "terminated"]) == 1
    assert p.read(first.id, outs).id == first.id
    p.delete(first.id, outs)
    assert p.read(first.id, outs).id == ""
    p.delete(first.id, outs)  # already gone: still fine


def test_read_keeps_a_dead_pod_that_still_bills_and_drops_one_terminated_outside_pulumi(sim, sim_env, keypair, name):
    p = GpuInstanceProvider()
    created = p.create(runpod_props(name, keypair))
    sim.kill_instance(created.id)  # EXITED: still in the account, still to be terminated by destroy
    kept = p.read(created.id, created.outs)
    assert kept.id == created.id and kept.outs["status"] == "stopped"
    sim.world.terminate(sim.world.instances[created.id])  # the console's terminate button
    gone = p.read(created.id, created.outs)
    assert (gone.id, gone.outs) == ("", {})


def test_a_create_that_fails_after_launch_leaves_nothing(sim, sim_env, keypair, name, monkeypatch):
    monkeypatch.setattr(sim.world.config, "boot_delay", 30.0)  # SSH will not answer within the deadline
    with pytest.raises(Exception, match="not reachable over SSH in time"):
        GpuInstanceProvider().create(runpod_props(name, keypair, ready_timeout_s=2))
    happened = [e["event"] for e in sim.world.events if e.get("name") == name]
    assert happened == ["launch", "terminate"]  # it did launch, and create ended what it launched
    assert not [i for i in own_instances(sim, name) if i["status"] != "terminated"]


def test_lambda_ssh_key_registers_adopts_and_deletes(sim, sim_env, keypair, name):
    p = LambdaSshKeyProvider()
    props = {"name": name, "public_key": keypair.public, "key_id": None}
    created = p.create(props)
    assert p.create(props).id == created.id and [k["name"] for k in sim.ssh_keys()].count(name) == 1
    assert p.read(created.id, created.outs).id == created.id
    p.delete(created.id, created.outs)
    assert name not in [k["name"] for k in sim.ssh_keys()] and p.read(created.id, created.outs).id == ""
    p.delete(created.id, created.outs)


def test_stack_config_keys_win_over_the_environment(sim, sim_env, monkeypatch):
    class Request:
        config = {"runpodApiKey": sim_env["RUNPOD_API_KEY"], "lambdaApiKey": None}

    monkeypatch.setenv("RUNPOD_API_KEY", "wrong")
    p = GpuInstanceProvider()
    p.configure(Request())
    assert isinstance(p.cloud("runpod").list("nothing-"), list)
