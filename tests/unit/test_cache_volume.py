"""Caches without a cloud: their names, what they cost, their config, the volume provider's diff and
delete with a fake cloud, the workspaces of the two projects, and the CLI's spaced task names."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from gpu_session import fit
from gpu_session.clouds import NotFound, Volume, VolumeInUse
from gpu_session.providers.volume import CacheVolumeProvider, VolumeStillUsed
from gpu_session.session import cache
from gpu_session.stack import cache_config, names
from gpu_session.stack.config import ConfigError


def test_cache_names():
    assert names.cache_stack("lambda", "us-east-1") == "lambda-us-east-1"
    assert names.cache_stack("runpod", "EU-RO-1") == "runpod-eu-ro-1"
    assert names.volume_name("us-east-1") == "gpu-session-cache-us-east-1"
    assert names.volume_name("EU-RO-1") == "gpu-session-cache-eu-ro-1"  # a Lambda filesystem name takes no capitals
    for ours in ("gpu-session-cache-us-east-1", "gpu-session-cache-eu-ro-1", "gpu-session-cache-us-south-1"):
        assert names.volume_is_ours(ours)
    for theirs in ("gpu-session-cache-", "gpu-session-cache-EU-RO-1", "my-cache", "gpu-session-dev-gpu",
                   "gpu-session-cache-us-east-1-old", "gpu-session-cache-../x-1", "xgpu-session-cache-us-east-1"):  # fmt: skip
        assert not names.volume_is_ours(theirs), theirs
    # an instance of ours is never taken for a volume, nor a cache volume for an instance's stack
    assert names.stack_of_instance("gpu-session-cache-us-east-1") is None


def test_monthly_cost_runpod_bills_the_size_lambda_what_it_holds():
    assert cache.monthly_usd("runpod", 20, 3 * cache.GB, 0.07) == 1.40
    assert cache.monthly_usd("runpod", None, None, 0.07) == 0.0
    assert cache.monthly_usd("lambda", None, 12_300_000_000, 0.20) == 2.46
    assert cache.monthly_usd("lambda", 100, None, 0.20) == 0.0  # a soft cap bills nothing; bytes do
    info = cache.CacheInfo("runpod", "EU-RO-1", "runpod-eu-ro-1", None, monthly_usd=7.30,
                           created_at=(datetime.now(UTC) - timedelta(hours=73)).isoformat())  # fmt: skip
    assert info.so_far_usd() == pytest.approx(0.73, abs=0.01)  # 73 h of a 730 h month
    assert cache.CacheInfo("lambda", "us-east-1", "lambda-us-east-1", None).so_far_usd() is None


@pytest.mark.parametrize("cloud", ["lambda", "runpod"])
def test_a_cache_whose_cloud_does_not_answer_costs_unknown_never_nothing(cloud, monkeypatch, tmp_path):
    """A volume still bills while its cloud (or the simulator it was made at) does not answer: its
    cost is unknown, never $0.00, and the sum says so; a simulator's cache says how to start one."""
    from types import SimpleNamespace

    from gpu_session.clouds import API_BASE_ENV, CloudError

    monkeypatch.setattr(cache, "workspaces", lambda project: tmp_path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / cache.ENVIRONMENT_FILE).write_text(json.dumps({API_BASE_ENV[cloud]: "http://127.0.0.1:9/api"}))
    stack = SimpleNamespace(config=lambda: {"cloud": cloud, "region": "r-1", "sizeGb": "30"},
                            outputs=lambda secrets=True: {"volume_id": "v1", "size_gb": 30, "created_at": "2026-11-01T00:00:00+00:00"})  # fmt: skip
    monkeypatch.setattr(cache, "engine", lambda *a, **k: stack)

    def no_answer(*a, **k):
        raise CloudError("ConnectionError")

    monkeypatch.setattr(cache, "_client", lambda *a: SimpleNamespace(volumes=no_answer))
    info = cache._info("c", {}, {})
    assert info.monthly_usd is None and info.so_far_usd() is None and info.volume is None
    assert info.note == f"{cloud} did not answer: ConnectionError (it was made at the simulator: `--sim` starts one)"
    assert "cost unknown" in info.describe() and info.as_json()["monthly_usd"] is None
    assert info.as_json()["exists"] is None  # not known to be gone: a script tells it from a deleted one
    with pytest.raises(cache.CacheError, match="cannot delete the cache .* did not answer"):
        cache.check_deletable(info)  # it may be attached to a running instance: nobody can say
    assert cache.total_text([1.5, None, 2.0]) == "at least 3.50 USD/month (1 cache's cost unknown: its cloud did not answer)"
    assert cache.total_text([1.5, 2.0]) == "3.50 USD/month" and cache.monthly_text(None) == "cost unknown"
    stopped = "nothing listens at 127.0.0.1:9: no simulator runs there now (`invoke sim` starts one)"

    def no_simulator(*a, **k):
        raise cache.NoSimulator(stopped)

    monkeypatch.setattr(cache, "_client", lambda *a: SimpleNamespace(volumes=no_simulator))
    assert cache._info("c", {}, {}).note == f"{cloud} did not answer: {stopped}"  # how to start one said once, by the error
    monkeypatch.setattr(cache, "_client", lambda *a: SimpleNamespace(volumes=no_answer))
    (tmp_path / "c" / cache.ENVIRONMENT_FILE).write_text("{}")  # made at the real API: no word of the simulator
    assert cache._info("c", {}, {}).note == f"{cloud} did not answer: ConnectionError"
    monkeypatch.setattr(cache, "_client", lambda *a: SimpleNamespace(volumes=lambda: []))
    gone = cache._info("c", {}, {})  # the cloud answered without it: gone, bills nothing, deletable
    assert gone.as_json()["exists"] is False and gone.monthly_usd == 0.0 and gone.note == "gone at the cloud"
    cache.check_deletable(gone)


@pytest.mark.parametrize(
    "cloud, region, size, says",
    [
        ("aws", "us-east-1", None, "unknown cloud 'aws': --cloud lambda or runpod"),
        ("lambda", "", None, "invalid region ''"),
        ("lambda", "us_east_1", None, "invalid region"),
        ("runpod", "EU RO 1", None, "a data center id like EU-RO-1"),
        ("lambda", "US-EAST-1", None, "--region us-east-1"),
        ("runpod", "eu-ro-1", None, "RunPod data centers are uppercase: --region EU-RO-1"),
        ("runpod", "EU-RO-1", 9, "from 22 to 4000"),
        (
            "runpod",
            "EU-RO-1",
            21,
            r"from 22 to 4000 \(got 21\): a cache holds the engine, whose install needs 20 GiB \(21.5 GB\)",
        ),
        ("lambda", "us-east-1", 21, "from 22 to 4000"),  # a soft cap below an engine's install: the same
        ("runpod", "EU-RO-1", 4001, "from 22 to 4000"),
        ("runpod", "EU-RO-1", "1e2", "whole number"),
        ("runpod", "EU-RO-1", -20, "whole number"),
        ("runpod", "EU-RO-1", 20.5, "whole number"),
    ],
)
def test_bad_input_says_what_to_do(cloud, region, size, says):
    with pytest.raises(cache.CacheError, match=says):
        cache.check(cloud, region, size)
    if size is None:  # find and rm refuse it too, before any stack is read
        with pytest.raises(cache.CacheError, match=says):
            cache.find(cloud, region)


def test_good_input():
    assert cache.check("runpod", "EU-RO-1", "22") == 22 and cache.check("runpod", "EU-RO-1", 30.0) == 30
    assert cache.check("lambda", "us-east-1") is None and cache.check("lambda", "us-east-1", 100) == 100


def test_cache_create_help_says_the_sizes_check_takes():
    from gpu_session.cli import tasks

    assert f"({cache.MIN_GB}-{cache_config.MAX_GB}, default {cache_config.DEFAULT_RUNPOD_GB}:" in tasks.cache_create.help["size"]
    assert f"{fit.cache_need(0) / fit.GB:.1f} GB" in tasks.cache_create.help["size"]


def test_cache_config():
    cfg = cache_config.parse({"gpu-session:cloud": "runpod", "gpu-session:region": "EU-RO-1", "gpu-session:runpodApiKey": "k"})
    assert cfg.sizeGb == cache_config.DEFAULT_RUNPOD_GB and "k" not in repr(cfg)
    # a bare `pulumi config set` in infra/cache/ writes the project's own namespace: taken too
    assert cache_config.parse({"gpu-session-cache:cloud": "lambda", "gpu-session-cache:region": "us-east-1"}).sizeGb is None
    with pytest.raises(ConfigError) as e:
        cache_config.parse({"gpu-session:cloud": "gcp", "gpu-session:sizeGB": "20", "gpu-session:sizeGb": "5"})
    said = str(e.value)
    assert "gpu-session:cloud must be lambda or runpod" in said and "did you mean gpu-session:sizeGb?" in said
    assert "gpu-session:sizeGb must be a whole number of GB from 10 to 4000" in said and "gpu-session:region is required" in said


class FakeCloud:
    name = "runpod"

    def __init__(self, in_use=False, gone=False):
        self.in_use, self.gone, self.deleted = in_use, gone, []

    def delete_volume(self, volume_id):
        if self.gone:
            raise NotFound("no such volume")
        if self.in_use:
            raise VolumeInUse("attached to pod abc")
        self.deleted.append(volume_id)

    def volumes(self):
        return (
            []
            if self.gone
            else [Volume("v1", "gpu-session-cache-eu-ro-1", "runpod", "EU-RO-1", 20, None, self.in_use, "/workspace")]
        )


def provider(fake: FakeCloud) -> CacheVolumeProvider:
    p = CacheVolumeProvider()
    p.cloud = lambda name: fake
    return p


OLDS = {"cloud": "runpod", "name": "gpu-session-cache-eu-ro-1", "region": "EU-RO-1", "size_gb": 20.0, "volume_id": "v1"}


def test_the_volume_provider_diff():
    p = provider(FakeCloud())
    assert not p.diff("v1", OLDS, {**OLDS, "size_gb": 20}).changes  # numbers cross gRPC as floats
    moved = p.diff("v1", OLDS, {**OLDS, "region": "US-KS-2", "name": "gpu-session-cache-us-ks-2"})
    assert moved.replaces == ["name", "region"] and moved.delete_before_replace
    with pytest.raises(ValueError, match="its size is not changed here.*cache.rm"):
        p.diff("v1", OLDS, {**OLDS, "size_gb": 40})
    lam = {**OLDS, "cloud": "lambda", "region": "us-east-1", "name": "gpu-session-cache-us-east-1", "size_gb": None}
    capped = p.diff("f1", lam, {**lam, "size_gb": 100})  # a Lambda soft cap: an update in place
    assert capped.changes and not capped.replaces


def test_the_volume_provider_never_deletes_a_volume_in_use():
    with pytest.raises(VolumeStillUsed, match="attached to a running instance, so it was not deleted.*`invoke down --stack S`"):
        provider(FakeCloud(in_use=True)).delete("v1", OLDS)
    provider(FakeCloud(gone=True)).delete("v1", OLDS)  # already gone: done
    assert provider(FakeCloud(gone=True)).read("v1", OLDS).id == ""  # gone: dropped from the state
    assert provider(FakeCloud()).read("v1", OLDS).outs["size_gb"] == 20


def test_the_two_projects_keep_their_workspaces_apart():
    from gpu_session.stack.automation import PROJECTS, workspace

    session, kept = workspace("lambda-us-east-1"), workspace("lambda-us-east-1", names.CACHE_PROJECT)
    assert session != kept and (session / "Pulumi.yaml").exists() and (kept / "Pulumi.yaml").exists()
    assert "name: gpu-session-cache" in (kept / "Pulumi.yaml").read_text()
    assert (kept / (kept / "Pulumi.yaml").read_text().split("main: ")[1].strip() / "__main__.py").is_file()
    assert set(PROJECTS) == {names.PROJECT, names.CACHE_PROJECT}


def test_the_script_takes_a_collections_task_with_a_space():
    from gpu_session.cli import dotted

    assert dotted(["gpu-session", "cache", "rm", "--yes"]) == ["gpu-session", "cache.rm", "--yes"]
    assert dotted(["gpu-session", "history", "list"]) == ["gpu-session", "history.list"]
    assert dotted(["gpu-session", "up", "--no-cache"]) == ["gpu-session", "up", "--no-cache"]


@pytest.mark.parametrize("cloud", ["lambda", "runpod"])
def test_a_cache_is_asked_where_it_was_made_whatever_this_shell_points_at(cloud, monkeypatch, tmp_path):
    """A cache made at the real API, asked from a shell pointed at the simulator, is asked at the real
    API (else it would look gone, `rm` would forget a volume that still bills, and its key would go
    to the simulator); one made on the simulator is asked there from a real shell; the shell's
    environment is as it was afterwards."""
    import json
    import os

    from gpu_session.clouds import API_BASE_ENVS

    monkeypatch.setattr(cache, "workspaces", lambda project: tmp_path)
    sim = {name: f"http://127.0.0.1:8080/{name}" for name in API_BASE_ENVS[cloud]}
    real_stack, sim_stack = "real-made", "sim-made"
    for stack, environment in ((real_stack, {}), (sim_stack, sim)):
        (tmp_path / stack).mkdir()
        (tmp_path / stack / cache.ENVIRONMENT_FILE).write_text(json.dumps(environment))
    for name, value in sim.items():
        monkeypatch.setenv(name, value)
    with cache._in_cache(real_stack, cloud) as own:
        assert not own and not any(name in os.environ for name in sim)
    assert all(os.environ[name] == value for name, value in sim.items())
    for name in sim:
        monkeypatch.delenv(name)
    with cache._in_cache(sim_stack, cloud) as own:
        assert own and all(os.environ[name] == value for name, value in sim.items())
    assert not any(name in os.environ for name in sim)


def test_sweep_keeps_a_pending_caches_volume_and_refuses_when_a_cache_stack_cannot_be_read(monkeypatch):
    """A cache stack with no volume yet (a create under way, or killed) keeps the volume of its name
    out of the orphans, while others are still found; an unreadable cache stack stops the search
    with an error naming it, not a silent "no orphans"."""
    from types import SimpleNamespace

    from gpu_session.stack.automation import StackError

    def volume(vid: str, region: str) -> Volume:
        return Volume(vid, names.volume_name(region), "runpod", region, 20, None, False, "/workspace")

    stacks = {"runpod-eu-ro-1": ({}, "EU-RO-1"), "runpod-us-ks-2": ({"volume_id": "v2"}, "US-KS-2")}
    volumes = [volume("v1", "EU-RO-1"), volume("v2", "US-KS-2"), volume("v3", "US-TX-3")]

    def engine(stack, create, project):
        if stack not in stacks:
            raise StackError("the state cannot be read")
        outputs, region = stacks[stack]
        return SimpleNamespace(outputs=lambda: outputs, config=lambda: {"region": region})

    monkeypatch.setattr(cache, "_stacks", lambda: sorted(stacks))
    monkeypatch.setattr(cache, "engine", engine)
    monkeypatch.setattr(cache, "_client", lambda cloud: SimpleNamespace(volumes=lambda: volumes))
    assert [(c, v.id) for c, v in cache.orphan_volumes(["runpod"])] == [("runpod", "v3")]
    monkeypatch.setattr(cache, "_stacks", lambda: [*sorted(stacks), "runpod-ca-mtl-1"])
    with pytest.raises(cache.CacheError, match="cache stack runpod-ca-mtl-1 cannot be read.*deletes none"):
        cache.orphan_volumes(["runpod"])


def test_sweep_that_cannot_read_a_cache_stack_fails_and_never_says_no_orphans(monkeypatch, capsys):
    """The face's last word after an unreadable cache stack is that error (exit 1), with what the
    instances' pass ended, not "no orphans"."""
    from invoke import Context, Exit

    from gpu_session.cli import tasks
    from gpu_session.session import down

    def blind(**_):
        raise cache.CacheError("cache stack runpod-ca-mtl-1 cannot be read (gone)")

    monkeypatch.setattr(tasks, "_user_config", lambda: None)
    monkeypatch.setattr(down, "sweep", lambda **_: [])
    monkeypatch.setattr(down, "sweep_volumes", blind)
    with pytest.raises(Exit) as ended:
        tasks.sweep.body(Context(), dry_run=True)
    assert ended.value.code == 1 and "runpod-ca-mtl-1 cannot be read" in str(ended.value.message)
    assert "0 orphan instance(s) terminated before that" in str(ended.value.message)
    assert "no orphans" not in capsys.readouterr().err
    with pytest.raises(Exit):
        tasks.sweep.body(Context(), dry_run=True, json=True)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    error = "cache stack runpod-ca-mtl-1 cannot be read (gone) (0 orphan instance(s) terminated before that)"
    assert summary == {"event": "summary", "ok": False, "error": error, "terminated": []}
