"""Cache volumes (a Lambda persistent filesystem, a RunPod network volume) through our clients against
the simulator: created or adopted, listed, attached at launch, kept across instances, deleted."""

from __future__ import annotations

import time

import pytest
import requests
import runpod
from conftest import FAST_RETRY, own_instances, ssh

from gpu_session.clouds import (
    CapacityError,
    InvalidRequest,
    LaunchSpec,
    NotFound,
    SshEndpoint,
    Volume,
    VolumeInUse,
)
from gpu_session.clouds.lambda_cloud import LambdaCloud
from gpu_session.clouds.runpod import VOLUME_MOUNT_PATH, RunpodCloud
from gpu_session.sim import SimConfig, Simulator
from gpu_session.sim.catalog import DEFAULT_CAPACITY


@pytest.fixture
def vol_name(sim, name):
    """A volume name unique to the test (valid on both clouds); its volumes are removed afterwards."""
    yield f"{name}-cache"
    for v in list(sim.world.volumes.values()):
        if v.name.startswith(name):
            sim.world.delete_volume(v)


@pytest.fixture
def isolated(sim):
    if not sim.world.hosts.isolated:
        pytest.skip("volumes are mounted only in isolated hosts (root)")


def nothing_made(sim, before: int) -> bool:
    return len(sim.world.volumes) == before and not any(e["event"] == "volume_created" for e in sim.world.events[before:])


# --- Lambda ---------------------------------------------------------------------------------


@pytest.fixture
def lam(sim_env) -> LambdaCloud:
    return LambdaCloud(retry=FAST_RETRY, launch_interval=0, poll_interval=0.05, timeout=5)


@pytest.fixture
def lam_key(lam, keypair, name):
    k = lam.register_ssh_key(f"{name}-key", keypair.public)
    yield k
    lam.delete_ssh_key(k.id)


@pytest.fixture
def lraw(sim):
    base = sim.env()["LAMBDA_API_BASE"]

    def call(method, path, body=None):
        return requests.request(method, base + path, json=body, headers={"Authorization": f"Bearer {sim.lambda_key}"}, timeout=10)

    return call


def test_lambda_filesystem_lives_across_instances(sim, lam, lam_key, keypair, name, vol_name, lraw, isolated):
    vol = lam.create_volume(vol_name, "us-south-1", None)
    assert (vol.name, vol.cloud, vol.region, vol.size_gb, vol.bytes_used, vol.in_use) == (
        vol_name, "lambda", "us-south-1", None, 0, False
    )  # fmt: skip
    assert vol.mount_point == f"/lambda/nfs/{vol_name}" and len(vol.id) == 32
    assert lam.create_volume(vol_name, "us-south-1", None) == vol  # adopted, not made twice
    assert [v for v in lam.volumes() if v.name == vol_name] == [vol]
    with pytest.raises(InvalidRequest, match="already exists in us-south-1"):
        lam.create_volume(vol_name, "us-east-1", None)

    # No region asked: the instance goes where the filesystem is.
    first = lam.launch(LaunchSpec(name=f"{name}-1", instance_type="gpu_1x_a10", ssh_key_name=lam_key.name, volume=vol))
    ep = lam.wait_ready(first, time.monotonic() + 30)
    assert lam.get(first).region == "us-south-1"
    got = lraw("GET", f"/instances/{first}").json()["data"]
    assert got["file_system_names"] == [vol_name]
    assert got["file_system_mounts"] == [{"mount_point": vol.mount_point, "file_system_id": vol.id}]
    out = ssh(
        ep, keypair, f"cd {vol.mount_point} && stat -c %U . && echo kept > weights && head -c 100000 /dev/zero > blob && ls"
    )
    assert out.returncode == 0 and out.stdout.split() == ["ubuntu", "blob", "weights"], out.stderr  # ubuntu writes, no sudo
    assert (sim.volume_dir(vol.id) / "weights").read_text() == "kept\n"  # the folder is what the host sees
    [listed] = [v for v in lam.volumes() if v.id == vol.id]
    assert listed.in_use and listed.bytes_used == 100005
    with pytest.raises(VolumeInUse, match="filesystem-in-use"):
        lam.delete_volume(vol.id)

    lam.terminate_and_wait(first, time.monotonic() + 30)
    sim.wait_gone(first)
    assert not [v for v in lam.volumes() if v.id == vol.id][0].in_use
    second = lam.launch(LaunchSpec(name=f"{name}-2", instance_type="gpu_1x_a10", ssh_key_name=lam_key.name, volume=vol))
    ep = lam.wait_ready(second, time.monotonic() + 30)
    assert ssh(ep, keypair, f"cat {vol.mount_point}/weights").stdout == "kept\n"
    lam.terminate_and_wait(second, time.monotonic() + 30)

    lam.delete_volume(vol.id)
    assert not any(v.id == vol.id for v in lam.volumes()) and not sim.volume_dir(vol.id).exists()
    with pytest.raises(NotFound):
        lam.delete_volume(vol.id)


def test_instances_without_a_filesystem_list_none(lraw, lam, lam_key, name):
    iid = lam.launch(LaunchSpec(name=name, instance_type="gpu_1x_a10", ssh_key_name=lam_key.name))
    got = lraw("GET", f"/instances/{iid}").json()["data"]
    assert got["file_system_names"] == [] and "file_system_mounts" not in got
    lam.terminate_and_wait(iid, time.monotonic() + 30)


@pytest.mark.parametrize("bad", ["", "1cache", "cache_1", "has space", "x" * 61, "-cache"])
def test_lambda_bad_filesystem_names_are_refused_before_any_call(sim, lam, bad):
    before = len(sim.world.events)
    with pytest.raises(InvalidRequest, match="invalid Lambda filesystem name"):
        lam.create_volume(bad, "us-east-1", None)
    assert len(sim.world.events) == before


def test_lambda_bad_requests_make_nothing(sim, lam, lam_key, name, vol_name, lraw):
    before = len(sim.world.volumes)
    with pytest.raises(InvalidRequest, match="global/invalid-parameters"):
        lam.create_volume(vol_name, "mars-1", None)  # the API's refusal
    assert len(sim.world.volumes) == before

    vol = lam.create_volume(vol_name, "us-east-1", None)
    with pytest.raises(InvalidRequest, match="only attach it there"):
        lam.launch(LaunchSpec(name=name, instance_type="gpu_1x_a10", region="us-west-1", ssh_key_name=lam_key.name, volume=vol))
    elsewhere = Volume("0" * 32, "other", "runpod", "EU-RO-1", 10, None, False, "/workspace")
    with pytest.raises(InvalidRequest, match="not a Lambda filesystem"):
        lam.launch(LaunchSpec(name=name, instance_type="gpu_1x_a10", ssh_key_name=lam_key.name, volume=elsewhere))
    assert own_instances(sim, name) == []

    # The wire: duplicate names, unknown or misplaced filesystems at launch, unknown ids.
    r = lraw("POST", "/filesystems", {"name": vol_name, "region": "us-west-1"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "global/duplicate")
    r = lraw("POST", "/filesystems", {"name": "x", "region": "nowhere"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "global/invalid-parameters")
    launch = {"region_name": "us-west-1", "instance_type_name": "gpu_1x_a10", "ssh_key_names": [lam_key.name]}
    r = lraw("POST", "/instance-operations/launch", {**launch, "file_system_names": ["absent"]})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "global/object-does-not-exist") and "absent" in r.text
    r = lraw("POST", "/instance-operations/launch", {**launch, "file_system_names": [vol_name]})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "instance-operations/launch/file-system-in-wrong-region")
    r = lraw("DELETE", "/filesystems/" + "0" * 32)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "global/object-does-not-exist")
    assert own_instances(sim, name) == [] and len(sim.world.volumes) == before + 1
    assert lraw("DELETE", f"/filesystems/{vol.id}").json() == {"data": {"deleted_ids": [vol.id]}}


def test_lambda_launch_with_a_filesystem_needs_capacity_where_it_is(sim, lam, lam_key, name, vol_name):
    vol = lam.create_volume(vol_name, "europe-central-1", None)
    sim.set_capacity("lambda", "gpu_1x_a10", 0, "europe-central-1")
    try:
        with pytest.raises(CapacityError, match="in europe-central-1 .where filesystem") as err:
            lam.launch(LaunchSpec(name=name, instance_type="gpu_1x_a10", ssh_key_name=lam_key.name, volume=vol))
        assert any("gpu_1x_a10 in us-east-1" in a for a in err.value.available)
    finally:
        sim.set_capacity("lambda", "gpu_1x_a10", DEFAULT_CAPACITY, "europe-central-1")
    assert own_instances(sim, name) == []


def test_lambda_create_that_fails_after_making_the_filesystem_adopts_it(sim, lam, vol_name):
    sim.inject("lambda:filesystems", "error_after_create")
    vol = lam.create_volume(vol_name, "us-east-1", None)
    assert [v["id"] for v in sim.volumes("lambda") if v["name"] == vol_name] == [vol.id]


# --- RunPod ---------------------------------------------------------------------------------


@pytest.fixture
def rp(sim_env) -> RunpodCloud:
    return RunpodCloud(retry=FAST_RETRY, poll_interval=0.05)


def pod_spec(name, keypair, **kw) -> LaunchSpec:
    return LaunchSpec(name=name, instance_type="NVIDIA GeForce RTX 4090", ssh_public_key=keypair.public, **kw)


def test_runpod_network_volume_lives_across_pods(sim, rp, keypair, name, vol_name, isolated):
    vol = rp.create_volume(vol_name, "EU-RO-1", 10)
    assert (vol.name, vol.cloud, vol.region, vol.size_gb, vol.bytes_used, vol.in_use, vol.mount_point) == (
        vol_name, "runpod", "EU-RO-1", 10, None, False, VOLUME_MOUNT_PATH
    )  # fmt: skip
    assert rp.create_volume(vol_name, "EU-RO-1", 10) == vol  # adopted
    with pytest.raises(InvalidRequest, match="already exists in EU-RO-1"):
        rp.create_volume(vol_name, "US-TX-3", 10)

    first = rp.launch(pod_spec(f"{name}-1", keypair, volume=vol))
    ep = rp.wait_ready(first, time.monotonic() + 30)
    assert rp.get(first).region == "EU-RO-1"  # placed where the volume is
    out = ssh(ep, keypair, "cd /workspace && stat -c %U . && echo kept > weights && cat weights")
    assert out.returncode == 0 and out.stdout.split() == ["root", "kept"], out.stderr
    [listed] = [v for v in rp.volumes() if v.id == vol.id]
    assert listed.in_use
    with pytest.raises(VolumeInUse, match="attached to a pod"):
        rp.delete_volume(vol.id)
    # The simulator's own answer (RunPod's is undocumented): a 400 naming the pod.
    r = requests.delete(
        f"{sim.env()['RUNPOD_REST_API_BASE_URL']}/networkvolumes/{vol.id}",
        headers={"Authorization": f"Bearer {sim.runpod_key}"},
        timeout=10,
    )
    assert r.status_code == 400 and first in r.json()["error"]

    rp.terminate_and_wait(first, time.monotonic() + 30)
    second = rp.launch(pod_spec(f"{name}-2", keypair, volume=vol))
    ep = rp.wait_ready(second, time.monotonic() + 30)
    assert ssh(ep, keypair, "cat /workspace/weights").stdout == "kept\n"
    rp.terminate_and_wait(second, time.monotonic() + 30)

    rp.delete_volume(vol.id)
    assert not any(v.id == vol.id for v in rp.volumes()) and not sim.volume_dir(vol.id).exists()
    with pytest.raises(NotFound):
        rp.delete_volume(vol.id)


@pytest.mark.parametrize(
    "name_, dc, size, match",
    [
        ("ok", "EU-RO-1", 9, "invalid network volume size"),
        ("ok", "EU-RO-1", 4001, "invalid network volume size"),
        ("ok", "EU-RO-1", None, "invalid network volume size"),
        ("ok", "EU-RO-1", 10.5, "invalid network volume size"),
        ('quo"te', "EU-RO-1", 10, "invalid network volume name"),
        ("", "EU-RO-1", 10, "invalid network volume name"),
        ("ok", "eu ro", 10, "invalid RunPod data center"),
    ],
)
def test_runpod_bad_volumes_are_refused_before_any_call(sim, rp, name_, dc, size, match):
    before = len(sim.world.events)
    with pytest.raises(InvalidRequest, match=match):
        rp.create_volume(name_, dc, size)
    assert len(sim.world.events) == before


def test_runpod_bad_requests_make_nothing(sim, rp, keypair, name, vol_name):
    before = len(sim.world.volumes)
    with pytest.raises(InvalidRequest, match="unknown data center"):
        rp.create_volume(vol_name, "XX-NOPE-1", 10)  # the API's refusal
    assert len(sim.world.volumes) == before
    vol = rp.create_volume(vol_name, "US-GA-1", 10)
    with pytest.raises(InvalidRequest, match="only attach it there"):
        rp.launch(pod_spec(name, keypair, region="EU-RO-1", volume=vol))
    assert own_instances(sim, name) == []
    # The wire: a deploy naming another data center than its volume's, or an unknown volume.
    gql = f"{sim.url}/graphql"
    auth = {"Authorization": f"Bearer {sim.runpod_key}"}
    deploy = 'mutation {{ podFindAndDeployOnDemand(input: {{name: "{n}", imageName: "x", gpuTypeId: "NVIDIA RTX A5000", {extra}}}) {{ id }} }}'
    for extra, message in (
        (f'networkVolumeId: "{vol.id}", dataCenterId: "EU-RO-1"', "Invalid dataCenterId"),
        ('networkVolumeId: "nope000000"', "not found"),
    ):
        r = requests.post(gql, json={"query": deploy.format(n=name, extra=extra)}, headers=auth, timeout=10).json()
        assert message in r["errors"][0]["message"] and r["errors"][0]["path"] == ["podFindAndDeployOnDemand"]
    assert own_instances(sim, name) == []
    rest = sim.env()["RUNPOD_REST_API_BASE_URL"]
    assert requests.get(f"{rest}/networkvolumes", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    r = requests.post(
        f"{rest}/networkvolumes", json={"name": "x", "size": 5, "dataCenterId": "EU-RO-1"}, headers=auth, timeout=10
    )
    assert r.status_code == 400 and "size" in r.json()["error"]
    assert requests.get(f"{rest}/networkvolumes/{vol.id}", headers=auth, timeout=10).json() == {
        "id": vol.id, "name": vol_name, "size": 10, "dataCenterId": "US-GA-1"
    }  # fmt: skip
    assert requests.delete(f"{rest}/networkvolumes/nope", headers=auth, timeout=10).status_code == 404
    assert requests.delete(f"{rest}/networkvolumes/{vol.id}", headers=auth, timeout=10).status_code == 204


def test_runpod_create_that_fails_after_making_the_volume_adopts_it(sim, rp, vol_name):
    sim.inject("runpod:networkvolumes", "error_after_create")
    vol = rp.create_volume(vol_name, "CA-MTL-1", 20)
    assert [v["id"] for v in sim.volumes("runpod") if v["name"] == vol_name] == [vol.id]


def test_unmodified_sdk_attaches_a_network_volume(sim, rp, sim_env, keypair, name, vol_name, isolated):
    """The SDK finds the volume's data center itself (myself.networkVolumes) and mounts it at its default path."""
    vol = rp.create_volume(vol_name, "EU-SE-1", 10)
    runpod.api_key = sim.runpod_key
    try:
        pod = runpod.create_pod(name, "runpod/base:0.0.0", "NVIDIA RTX A5000", ports="22/tcp",
                                env={"PUBLIC_KEY": keypair.public}, network_volume_id=vol.id)  # fmt: skip
        got = runpod.get_pod(pod["id"])
        assert got["volumeMountPath"] == "/runpod-volume"
    finally:
        runpod.api_key = None
    assert rp.get(pod["id"]).region == "EU-SE-1"
    ep = rp.wait_ready(pod["id"], time.monotonic() + 30)
    assert ssh(SshEndpoint(ep.host, ep.port, "root"), keypair, "touch /runpod-volume/x && ls /runpod-volume").stdout == "x\n"
    rp.terminate_and_wait(pod["id"], time.monotonic() + 30)


# --- hosts ----------------------------------------------------------------------------------


def test_mount_points_are_private_to_each_host_without_a_volume(sim, lam, lam_key, keypair, name, isolated):
    """/workspace and /lambda exist in every host (empty, its own): what one host writes there no other sees."""
    ids = [lam.launch(LaunchSpec(name=f"{name}-{n}", instance_type="gpu_1x_a10", ssh_key_name=lam_key.name)) for n in (1, 2)]
    a, b = (lam.wait_ready(i, time.monotonic() + 30) for i in ids)
    assert ssh(a, keypair, "echo mine | sudo tee /workspace/x /lambda/x >/dev/null").returncode == 0
    assert ssh(b, keypair, "ls -A /workspace /lambda").stdout.split() == ["/lambda:", "/workspace:"]
    for i in ids:
        lam.terminate_and_wait(i, time.monotonic() + 30)


def test_unprivileged_simulator_refuses_to_attach_volumes(tmp_path, keypair, monkeypatch):
    """Loopback hosts share this machine's filesystem and cannot mount: volumes are kept and listed,
    and a launch with one is refused with the reason."""
    config = SimConfig(boot_delay=0.1, terminate_delay=0.05, gone_after=0.2, lambda_rate=0, isolate_hosts=False)
    with Simulator(tmp_path / "sim", config) as sim:
        cloud = LambdaCloud(api_key=sim.lambda_key, base_url=sim.env()["LAMBDA_API_BASE"], retry=FAST_RETRY, launch_interval=0)
        key = cloud.register_ssh_key("k", keypair.public)
        vol = cloud.create_volume("cache", "us-east-1", None)
        with pytest.raises(InvalidRequest, match="isolated hosts"):
            cloud.launch(LaunchSpec(name="v", instance_type="gpu_1x_a10", ssh_key_name=key.name, volume=vol))
        assert sim.instances() == []
        monkeypatch.setenv("RUNPOD_REST_API_BASE_URL", sim.env()["RUNPOD_REST_API_BASE_URL"])
        rp = RunpodCloud(api_key=sim.runpod_key, base_url=sim.env()["RUNPOD_API_BASE_URL"], retry=FAST_RETRY)
        pv = rp.create_volume("cache", "EU-RO-1", 10)
        with pytest.raises(InvalidRequest, match="isolated hosts"):
            rp.launch(pod_spec("v", keypair, volume=pv))
        assert sim.instances() == []
    # The volumes outlive the simulator: a new one over the same folder still has them.
    with Simulator(tmp_path / "sim", config) as again:
        assert sorted(v["name"] for v in again.volumes()) == ["cache", "cache"]


def test_runpod_spot_pod_attaches_its_volume_where_it_is(sim, rp, keypair, name, vol_name, isolated):
    vol = rp.create_volume(vol_name, "CA-MTL-1", 10)
    iid = rp.launch(pod_spec(name, keypair, volume=vol, spot=True, bid_per_gpu=0.5))
    assert rp.get(iid).region == "CA-MTL-1" and [v.in_use for v in rp.volumes() if v.id == vol.id] == [True]
    [inst] = [i for i in sim.world.listing("runpod") if i.id == iid]
    assert (inst.spot, inst.volume_ids, inst.volume_mount_path) == (True, [vol.id], VOLUME_MOUNT_PATH)
    rp.terminate_and_wait(iid, time.monotonic() + 30)


def test_runpod_pod_with_a_volume_needs_capacity_where_it_is(sim, rp, keypair, name, vol_name):
    vol = rp.create_volume(vol_name, "US-TX-3", 10)
    sim.set_capacity("runpod", "NVIDIA GeForce RTX 4090", 0, "US-TX-3")
    try:
        with pytest.raises(CapacityError, match="no longer any instances available"):
            rp.launch(pod_spec(name, keypair, volume=vol))
    finally:
        sim.set_capacity("runpod", "NVIDIA GeForce RTX 4090", DEFAULT_CAPACITY, "US-TX-3")
    assert own_instances(sim, name) == []


def test_volume_prices_per_gb_month():
    assert (LambdaCloud.volume_price_per_gb_month, RunpodCloud.volume_price_per_gb_month) == (0.20, 0.07)
