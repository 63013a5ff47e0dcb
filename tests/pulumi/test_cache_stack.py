"""Cache volumes as stacks of their own (project gpu-session-cache, infra/cache/) on the real engine
against the simulator: create (and adopt on a second create), list with size and cost, rm (volume,
stack and workspace gone), rm refused while a session stack records the volume, bad input changing
nothing, sweep finding an orphan volume and not a cache's, down's report of the caches that remain,
and the program alone with the `pulumi` CLI.

Sessions here are faked (a session record naming the volume, as `up` writes it) rather than
launched: what is under test is the cache's side; tests/e2e/test_cache.py runs real sessions on one."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from gpu_session.clouds import get_cloud
from gpu_session.local import record
from gpu_session.paths import state_dir
from gpu_session.session import cache, down
from gpu_session.stack import names
from gpu_session.stack.automation import StackError, StackNotFound, engine, pulumi_binary, workspaces

ROOT = Path(__file__).resolve().parents[2]
# A Lambda region and a RunPod data center the simulator knows.
WHERE = {"lambda": "us-east-1", "runpod": "EU-RO-1"}
NOWHERE = {"lambda": "us-west-9", "runpod": "US-WEST-9"}  # well-formed regions with no cache here


def quiet(_=None) -> None:
    pass


def volumes(sim, cloud: str) -> list[dict]:
    return [v for v in sim.volumes() if v["cloud"] == cloud]


def stack_exists(stack: str) -> bool:
    try:
        engine(stack, create=False, project=names.CACHE_PROJECT)
        return True
    except StackNotFound:
        return False


@pytest.fixture
def clean(sim, sim_env):
    """No cache stack and no volume before or after the test (a failed test's are removed)."""
    yield
    for info in cache.caches():
        stack = engine(info.stack, create=False, project=names.CACHE_PROJECT)
        stack.destroy()
        stack.remove()
    for v in sim.volumes():
        client = get_cloud(v["cloud"], api_key=sim_env["LAMBDA_API_KEY" if v["cloud"] == "lambda" else "RUNPOD_API_KEY"])
        client.delete_volume(v["id"])


@pytest.mark.parametrize("cloud", ["lambda", "runpod"])
def test_create_adopts_on_the_second_and_rm_leaves_nothing(sim, clean, cloud):
    region = WHERE[cloud]
    said = []
    made = cache.create(cloud, region, 25, say=said.append, on_event=quiet)
    [vol] = volumes(sim, cloud)
    assert (
        made.volume.id == vol["id"]
        and vol["name"] == names.volume_name(region)
        and made.stack == names.cache_stack(cloud, region)
    )
    assert stack_exists(made.stack) and (workspaces(names.CACHE_PROJECT) / made.stack).is_dir()
    if cloud == "lambda":  # a filesystem has no size: the 25 GB is a soft cap, and said so
        assert made.size_gb == 25 and any("soft cap" in s for s in said) and vol.get("size_gb") in (None, 0)
    else:
        assert made.size_gb == 25 and made.monthly_usd == round(25 * made.price_per_gb_month, 2) > 0

    said_again = []
    again = cache.create(cloud, region, 25, say=said_again.append, on_event=quiet)
    assert again.volume.id == made.volume.id and len(volumes(sim, cloud)) == 1  # adopted, not made twice
    assert f"cache {cloud} {region} was already here: nothing changed" in said_again, said_again
    if cloud == "lambda":  # the one thing again can change: the soft cap, and it says so
        capped = []
        cache.create(cloud, region, 35, say=capped.append, on_event=quiet)
        assert f"cache {cloud} {region} was already here: its soft cap is now 35 GB" in capped, capped
        cache.create(cloud, region, 25, say=quiet, on_event=quiet)
        unsized = []  # again without --size: the soft cap stays as it was
        cache.create(cloud, region, None, say=unsized.append, on_event=quiet)
        assert f"cache {cloud} {region} was already here: nothing changed" in unsized and cache.find(cloud, region).size_gb == 25

    [listed] = [c for c in cache.caches() if c.cloud == cloud]
    assert listed.region == region and listed.size_gb == 25 and not listed.in_use and listed.note == ""
    assert cache.find(cloud, region).volume_id == made.volume.id and cache.find(cloud, NOWHERE[cloud]) is None

    removed = cache.rm(cloud, region, say=said.append, on_event=quiet)
    assert removed.volume_id == made.volume.id and volumes(sim, cloud) == []
    assert not stack_exists(made.stack) and not (workspaces(names.CACHE_PROJECT) / made.stack).exists()
    backend = state_dir() / "pulumi" / ".pulumi"
    assert not list(backend.glob(f"stacks/{names.CACHE_PROJECT}/{made.stack}.json*"))
    assert cache.caches() == [] and cache.find(cloud, region) is None


def test_a_volume_made_outside_the_stack_is_adopted(sim, sim_env, clean):
    client = get_cloud("runpod", api_key=sim_env["RUNPOD_API_KEY"])
    outside = client.create_volume(names.volume_name("EU-RO-1"), "EU-RO-1", 40)
    with pytest.raises(cache.CacheError, match="already exists at runpod with 40 GB, not 30") as e:
        cache.create("runpod", "EU-RO-1", 30, say=quiet, on_event=quiet)
    assert "--size 40" in str(e.value) and not stack_exists("runpod-eu-ro-1")
    said = []
    made = cache.create("runpod", "EU-RO-1", None, say=said.append, on_event=quiet)  # no size: as it is
    assert made.volume.id == outside.id and made.size_gb == 40 and any("adopts it" in s for s in said)
    assert len(volumes(sim, "runpod")) == 1
    small = client.create_volume(names.volume_name("EU-SE-1"), "EU-SE-1", 10)  # RunPod sells from 10 GB; create, from 22
    with pytest.raises(cache.CacheError, match="already exists at runpod with 10 GB, not 30") as e:
        cache.create("runpod", "EU-SE-1", 30, say=quiet, on_event=quiet)
    assert "no --size takes it as it is" in str(e.value) and "--size 10" not in str(e.value), e.value
    assert not stack_exists("runpod-eu-se-1") and [v.size_gb for v in client.volumes() if v.id == small.id] == [10]


@pytest.mark.parametrize(
    "cloud, region, size, says",
    [
        ("aws", "us-east-1", None, "unknown cloud 'aws'"),
        ("lambda", "us east", None, "invalid region 'us east'"),
        ("lambda", "US-EAST-1", None, "Lambda regions are lowercase"),
        ("runpod", "EU-RO-1", 5, "from 22 to 4000"),
        ("runpod", "EU-RO-1", 21, "from 22 to 4000"),  # RunPod's smallest (10) holds no engine
        ("runpod", "EU-RO-1", 12.5, "whole number"),
        ("runpod", "EU-RO-1", "lots", "whole number"),
        ("lambda", "us-east-1", 0, "from 22 to 4000"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(sim, clean, cloud, region, size, says):
    before = sorted(p.name for p in workspaces(names.CACHE_PROJECT).glob("*")) if workspaces(names.CACHE_PROJECT).exists() else []
    with pytest.raises(cache.CacheError, match=says):
        cache.create(cloud, region, size, say=quiet, on_event=quiet)
    after = sorted(p.name for p in workspaces(names.CACHE_PROJECT).glob("*")) if workspaces(names.CACHE_PROJECT).exists() else []
    assert after == before and sim.volumes() == []


def test_a_region_the_cloud_refuses_leaves_no_stack_behind(sim, clean):
    with pytest.raises(StackError) as refused:
        cache.create("lambda", "mars-north-1", None, say=quiet, on_event=quiet)
    # One line: the cloud's words, not the provider's traceback nor the engine's "update failed".
    said = str(refused.value)
    assert "\n" not in said and "InvalidRequest: Lambda API POST /filesystems" in said and "not a valid region" in said, said
    assert "Traceback" not in said and "update failed" not in said, said
    assert not stack_exists("lambda-mars-north-1") and not (workspaces(names.CACHE_PROJECT) / "lambda-mars-north-1").exists()
    locks = state_dir() / "pulumi" / ".pulumi" / "locks"
    assert not list(locks.glob(f"*/{names.CACHE_PROJECT}/lambda-mars-north-1"))  # not even the CLI's empty lock folder
    assert sim.volumes() == []


def test_rm_is_refused_while_a_session_records_the_volume(sim, clean):
    made = cache.create("lambda", "us-east-1", None, say=quiet, on_event=quiet)
    # A live session's record, as `up` writes it, whose outputs name the cache's volume.
    outputs = {"cloud": "lambda", "instance_id": "i-fake", "host": "10.0.0.9", "port": 22, "user": "ubuntu",
               "price_per_hour": 0.75, "model": "gpu-session/tiny-chat", "backend": "vllm",
               "served_model_name": "gpu-session/tiny-chat", "cache_volume_id": made.volume.id}  # fmt: skip
    record.save("uses-cache", outputs, {})
    try:
        [listed] = cache.caches()
        assert listed.in_use_by == ["uses-cache"]
        with pytest.raises(cache.CacheError, match="in use by session stack uses-cache") as e:
            cache.rm("lambda", "us-east-1", say=quiet, on_event=quiet)
        assert "`invoke down --stack uses-cache`" in str(e.value)
        assert [v["id"] for v in volumes(sim, "lambda")] == [made.volume.id] and stack_exists(made.stack)
    finally:
        (state_dir() / "stacks" / "uses-cache" / record.FILE).unlink()
    cache.rm("lambda", "us-east-1", say=quiet, on_event=quiet)
    assert volumes(sim, "lambda") == []


def test_a_volume_gone_at_the_cloud_is_listed_as_gone(sim, sim_env, clean):
    made = cache.create("lambda", "us-west-1", None, say=quiet, on_event=quiet)
    get_cloud("lambda", api_key=sim_env["LAMBDA_API_KEY"]).delete_volume(made.volume.id)
    [gone] = cache.caches()
    assert gone.volume is None and gone.note == "gone at the cloud" and gone.monthly_usd == 0
    cache.rm("lambda", "us-west-1", say=quiet, on_event=quiet)  # tidies its stack
    assert not stack_exists(made.stack)


def test_sweep_finds_an_orphan_volume_and_not_a_caches(sim, sim_env, clean):
    made = cache.create("lambda", "us-east-1", None, say=quiet, on_event=quiet)
    client = get_cloud("runpod", api_key=sim_env["RUNPOD_API_KEY"])
    orphan = client.create_volume(names.volume_name("EU-RO-1"), "EU-RO-1", 10)
    other = client.create_volume("someone-elses", "EU-RO-1", 10)  # not named like ours: never touched
    found = cache.orphan_volumes(["lambda", "runpod"])
    assert [(c, v.id) for c, v in found] == [("runpod", orphan.id)]
    asked = []
    deleted = down.sweep_volumes(confirm=lambda c, v: asked.append(v.id) or True, say=quiet)
    assert asked == deleted == [orphan.id]
    assert {v["id"] for v in sim.volumes()} == {made.volume.id, other.id}
    client.delete_volume(other.id)


def test_down_reports_the_caches_that_remain(sim, clean):
    made = cache.create("runpod", "EU-RO-1", 25, say=quiet, on_event=quiet)
    summary = down.down("no-such-session", say=quiet, on_event=quiet)
    [kept] = summary["caches"]
    assert kept["cloud"] == "runpod" and kept["region"] == "EU-RO-1" and kept["volume_id"] == made.volume.id
    assert kept["monthly_usd"] == made.monthly_usd > 0
    from gpu_session.cli.tasks import _down_summary

    lines = _down_summary(summary)
    assert any(
        line.startswith("cache runpod EU-RO-1 kept: 25 GB, $")
        and "`invoke cache.rm --cloud runpod --region EU-RO-1` deletes it" in line
        for line in lines
    ), lines


def test_pulumi_up_and_destroy_in_the_cache_folder_alone(sim, sim_env, clean, tmp_path, monkeypatch):
    """The cache project with the bare `pulumi` CLI, as for the session project: its own folder, keys as secrets."""
    folder = tmp_path / "cache"
    folder.mkdir()
    for name in ("Pulumi.yaml", "__main__.py"):  # the config file lands here, not in the checkout
        (folder / name).symlink_to(ROOT / "infra" / "cache" / name)
    env = {**os.environ, "PATH": f"{pulumi_binary().parent}:{os.environ['PATH']}", "PULUMI_BACKEND_URL": f"file://{tmp_path}",
           "PULUMI_CONFIG_PASSPHRASE": "typed", "PULUMI_PYTHON_CMD": os.sys.executable,
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    key = env.pop("LAMBDA_API_KEY")

    def sh(line: str, stdin: str = "") -> str:
        done = subprocess.run(["bash", "-c", line], cwd=folder, env=env, input=stdin, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        return done.stdout

    sh("pulumi stack init lambda-us-south-1 && pulumi config set gpu-session:cloud lambda"
       " && pulumi config set gpu-session:region us-south-1")  # fmt: skip
    sh("pulumi config set --secret gpu-session:lambdaApiKey", stdin=key + "\n")
    sh("pulumi up --yes")
    [vol] = volumes(sim, "lambda")
    assert (
        vol["name"] == "gpu-session-cache-us-south-1" and json.loads(sh("pulumi stack output --json"))["volume_id"] == vol["id"]
    )
    sh("pulumi destroy --yes")
    assert volumes(sim, "lambda") == []


def test_the_commands(sim, clean):
    """`cache create|list|rm` as a person types them (invoke in the checkout; the script's spaced form too)."""
    invoke = [os.sys.executable, "-m", "invoke"]
    script = [os.sys.executable, "-c", "from gpu_session.cli import main; main()"]

    def run(argv: list[str], *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*argv, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)

    bad = run(invoke, "cache.create", "--cloud", "runpod", "--region", "EU-RO-1", "--size", "5")
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: --size takes a whole number of GB from 22 to 4000")
    missing = run(invoke, "cache.rm", "--cloud", "runpod", "--region", "EU-RO-1")  # none yet: said, not "pass --yes"
    assert (
        missing.returncode == 1
        and missing.stderr.strip() == "error: no cache runpod EU-RO-1 here: `invoke cache.list` shows them"
    )
    refused = run(invoke, "cache.create", "--cloud", "runpod", "--region", "MARS-1")  # the cloud knows no such data center
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and "Traceback" not in refused.stderr and len(lines) <= 3, refused.stderr
    assert lines[-1].startswith("error: pulumi up failed on stack runpod-mars-1: InvalidRequest:") and "MARS-1" in lines[-1]
    assert sim.volumes() == []
    made = run(invoke, "cache.create", "--cloud", "runpod", "--region", "EU-RO-1", "--size", "25", "--json")
    assert made.returncode == 0, made.stderr[-2000:]
    result = [json.loads(line) for line in made.stdout.splitlines() if line.startswith("{")][-1]
    assert result["event"] == "summary" and result["cache"]["size_gb"] == 25 and result["cache"]["monthly_usd"] == 1.75

    listed = run(script, "cache", "list", "--json")
    assert listed.returncode == 0, listed.stderr[-2000:]
    [row] = json.loads(listed.stdout)
    assert (row["cloud"], row["region"], row["size_gb"], row["monthly_usd"], row["in_use_by"]) == (
        "runpod",
        "EU-RO-1",
        25,
        1.75,
        [],
    )
    table = run(invoke, "cache.list")
    assert "EU-RO-1" in table.stdout and "1.75 USD/month" in table.stdout, table.stdout + table.stderr

    outputs = {"cloud": "runpod", "instance_id": "p-fake", "host": "10.0.0.9", "port": 22, "user": "root", "price_per_hour": 0.69,
               "model": "gpu-session/tiny-chat", "backend": "vllm", "served_model_name": "gpu-session/tiny-chat",
               "cache_volume_id": result["cache"]["volume_id"]}  # fmt: skip
    record.save("holds-it", outputs, {})  # a live session on it: said first, not "pass --yes", which would not help
    try:
        used = run(invoke, "cache.rm", "--cloud", "runpod", "--region", "EU-RO-1")
        assert used.returncode == 1 and "in use by session stack holds-it" in used.stderr and "--yes" not in used.stderr
    finally:
        (state_dir() / "stacks" / "holds-it" / record.FILE).unlink()
    asked = run(invoke, "cache.rm", "--cloud", "runpod", "--region", "EU-RO-1")  # no terminal to ask: refused
    assert asked.returncode == 1 and "pass --yes" in asked.stderr and len(volumes(sim, "runpod")) == 1
    removed = run(script, "cache", "rm", "--cloud", "runpod", "--region", "EU-RO-1", "--yes")
    assert removed.returncode == 0, removed.stderr[-2000:]
    assert "$1.75/month stops" in removed.stderr and volumes(sim, "runpod") == []
    # `cost` still counts what it cost while it was kept.
    costs = run(invoke, "cost", "--json")
    gone = [d for d in json.loads(costs.stdout)["deleted_caches"] if d["volume_id"] == result["cache"]["volume_id"]]
    assert costs.returncode == 0 and [(d["cloud"], d["region"]) for d in gone] == [("runpod", "EU-RO-1")], costs.stdout
    assert gone[0]["cost"] is not None and gone[0]["cost"] >= 0 and gone[0]["created_at"]
    assert "deleted caches: " in run(invoke, "cost").stdout


def test_a_volume_an_instance_has_attached_is_never_deleted(sim, sim_env, clean, keypair, name):
    """No session here records it, but the cloud says a pod has it: rm refuses, and so does the
    stack's own destroy (the provider), with nothing deleted; once the pod is gone, rm goes ahead."""
    import time

    from gpu_session.clouds import LaunchSpec

    made = cache.create("runpod", "EU-RO-1", 25, say=quiet, on_event=quiet)
    client = get_cloud("runpod", api_key=sim_env["RUNPOD_API_KEY"])
    pod = client.launch(
        LaunchSpec(name=f"{name}-pod", instance_type="NVIDIA GeForce RTX 4090", ssh_public_key=keypair.public, volume=made.volume)
    )
    try:
        with pytest.raises(cache.CacheError, match="attached to a running runpod instance"):
            cache.rm("runpod", "EU-RO-1", say=quiet, on_event=quiet)
        stack = engine(made.stack, create=False, project=names.CACHE_PROJECT)
        with pytest.raises(StackError, match="attached to a running instance, so it was not deleted"):
            stack.destroy()
        assert [v["id"] for v in volumes(sim, "runpod")] == [made.volume.id] and stack.resources()
    finally:
        client.terminate_and_wait(pod, time.monotonic() + 60)
    cache.rm("runpod", "EU-RO-1", say=quiet, on_event=quiet)
    assert volumes(sim, "runpod") == [] and not stack_exists(made.stack)


def test_a_session_stack_attaches_the_cache_and_its_destroy_leaves_it(sim, sim_env, clean):
    """A session stack (project gpu-session) whose config names the cache's volume: while it holds a
    machine, the cache is in use by it (from its config alone: no session record here) and rm is
    refused naming it; its destroy leaves the volume (another project's), and rm then goes ahead."""
    made = cache.create("lambda", "us-east-1", None, say=quiet, on_event=quiet)
    session = engine("p-cache-user")
    try:
        session.set_config({"model": "gpu-session/tiny-chat", "cloud": "lambda", "configure": "false",
                            "cacheVolume": made.volume.id, "lambdaApiKey": sim.lambda_key})  # fmt: skip
        outputs = session.up()
        assert outputs["cache_volume_id"] == made.volume.id
        [used] = cache.caches()
        assert used.in_use_by == ["p-cache-user"] and used.in_use
        with pytest.raises(cache.CacheError, match="in use by session stack p-cache-user"):
            cache.rm("lambda", "us-east-1", say=quiet, on_event=quiet)
    finally:
        session.destroy()
        session.remove()
    [kept] = cache.caches()
    assert kept.volume is not None and kept.volume.id == made.volume.id and not kept.in_use
    cache.rm("lambda", "us-east-1", say=quiet, on_event=quiet)
    assert volumes(sim, "lambda") == []
