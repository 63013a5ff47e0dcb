"""The RunPod client and the unmodified runpod SDK against the simulator's GraphQL API."""

from __future__ import annotations

import json
import shlex
import time

import pytest
import requests
import runpod
from conftest import FAST_RETRY, own_instances, ssh

from gpu_session.clouds import AuthError, CapacityError, InvalidRequest, LaunchSpec, NotFound, SshEndpoint, Status
from gpu_session.clouds.runpod import RunpodCloud
from gpu_session.sim.catalog import DEFAULT_CAPACITY


@pytest.fixture
def cloud(sim_env) -> RunpodCloud:
    return RunpodCloud(retry=FAST_RETRY, poll_interval=0.05)


def spec(name, keypair, **kw) -> LaunchSpec:
    return LaunchSpec(name=name, instance_type="NVIDIA GeForce RTX 4090", ssh_public_key=keypair.public, **kw)


def test_offers_cover_counts_and_spot(cloud):
    offers = [o for o in cloud.offers() if o.instance_type == "NVIDIA H100 80GB HBM3"]
    on_demand = {o.gpu_count: o for o in offers if not o.spot}
    assert sorted(on_demand) == [1, 2, 4, 8]
    assert on_demand[2].price_per_hour == pytest.approx(2 * 2.69) and on_demand[2].total_vram_gb == 160
    assert on_demand[1].gpu_name == "H100 SXM" and on_demand[1].regions == ("any",)
    assert any(o.spot for o in offers)


def test_launch_ssh_list_terminate_and_host_gone(sim, cloud, keypair, name):
    iid = cloud.launch(spec(name, keypair))
    endpoint = cloud.wait_ready(iid, time.monotonic() + 30)
    assert endpoint.user == "root" and endpoint.port != 22  # a mapped public port, as on RunPod
    out = ssh(endpoint, keypair, "whoami; echo $RUNPOD_POD_ID; nvidia-smi -L; test -d /run/systemd/system || echo no-systemd")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["root", iid, "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-sim-00000000)", "no-systemd"]
    ssh(endpoint, keypair, "nohup sleep 600 >/dev/null 2>&1 & mkdir -p /workspace && echo x > /root/file")

    [inst] = cloud.list(name)
    assert (inst.id, inst.status, inst.gpu_name, inst.gpu_count) == (iid, Status.RUNNING, "RTX 4090", 1)
    assert inst.price_per_hour == pytest.approx(0.69) and inst.region

    cloud.terminate_and_wait(iid, time.monotonic() + 30)
    sim.wait_gone(iid)
    assert sim.host_pids(iid) == [] and not sim.host_dir(iid).exists()
    with pytest.raises(NotFound):
        cloud.get(iid)
    cloud.terminate_and_wait(iid, time.monotonic() + 5)  # already gone is success


def test_pods_land_where_the_driver_runs_our_cuda_and_report_real_memory(sim, cloud, sdk, keypair, name, gql):
    iid = cloud.launch(spec(name, keypair))
    endpoint = cloud.wait_ready(iid, time.monotonic() + 30)
    out = ssh(endpoint, keypair, "nvidia-smi --query-gpu=memory.total,driver_version --format=csv,noheader,nounits")
    assert out.returncode == 0, out.stderr
    memory, driver = out.stdout.strip().split(", ")
    assert memory == "24564" and tuple(map(int, driver.split("."))) >= (580,)  # an RTX 4090; CUDA 13 runs
    cloud.terminate_and_wait(iid, time.monotonic() + 30)
    # Without allowedCudaVersions RunPod may place a pod on an old driver: as the unmodified SDK does.
    sdk.api_key = sim.runpod_key  # our client clears the SDK's global after each call
    pod = sdk.create_pod(name + "-any", "runpod/base:0.0.0", "NVIDIA GeForce RTX 4090", ports="22/tcp")
    [landed] = own_instances(sim, name + "-any")
    assert landed["driver"] == "550.127.05"
    sdk.terminate_pod(pod["id"])
    # A CUDA version no host runs: RunPod's no-capacity answer, and nothing made.
    deploy = (f'mutation {{ podFindAndDeployOnDemand(input: {{name: "{name}-old", imageName: "i", '
              'gpuTypeId: "NVIDIA GeForce RTX 4090", allowedCudaVersions: ["11.8"]}) { id } }')  # fmt: skip
    assert gql(deploy).json()["errors"][0]["message"].startswith("There are no longer any instances available")
    assert own_instances(sim, name + "-old") == []


def test_pod_is_running_with_null_runtime_until_the_host_is_up(sim, cloud, keypair, name):
    sim.world.config.boot_delay = 1.0
    try:
        iid = cloud.launch(spec(name, keypair))
        inst = cloud.get(iid)
        assert (inst.raw_status, inst.status, inst.endpoint) == ("RUNNING", Status.PENDING, None)
    finally:
        sim.world.config.boot_delay = 0.3
    assert isinstance(cloud.wait_ready(iid, time.monotonic() + 30), SshEndpoint)
    cloud.terminate_and_wait(iid, time.monotonic() + 30)


def test_second_launch_with_same_name_adopts(sim, cloud, keypair, name):
    first = cloud.launch(spec(name, keypair))
    assert cloud.launch(spec(name, keypair)) == first and len(own_instances(sim, name)) == 1
    cloud.terminate_and_wait(first, time.monotonic() + 30)


def test_spot_pod(sim, cloud, keypair, name):
    iid = cloud.launch(spec(name, keypair, spot=True, bid_per_gpu=0.40))
    assert cloud.get(iid).price_per_hour == pytest.approx(0.40)
    cloud.terminate_and_wait(iid, time.monotonic() + 30)
    with pytest.raises(InvalidRequest, match="minimum bid"):
        cloud.launch(spec(name, keypair, spot=True, bid_per_gpu=0.01))
    assert own_instances(sim, name) == []


def test_sdk_key_comes_from_our_config_not_the_module_global(sim_env, cloud, keypair):
    runpod.api_key = "stale-key-from-home-runpod-config"
    assert cloud.offers()
    assert runpod.api_key is None  # ours is not left behind in the SDK either


# --- bad input ------------------------------------------------------------------------------


def test_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    with pytest.raises(AuthError, match="RUNPOD_API_KEY"):
        RunpodCloud()


def test_wrong_key_is_an_auth_error(sim_env):
    with pytest.raises(AuthError, match="Unauthorized"):
        RunpodCloud(api_key="wrong", retry=FAST_RETRY).offers()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"name": 'a"b'}, "invalid name"),
        ({"env": {"X": 'say "hi"'}}, "quotes, backslashes or newlines"),
        ({"env": {"X": "back\\slash"}}, "quotes, backslashes or newlines"),
        ({"env": {"X": "two\nlines"}}, "quotes, backslashes or newlines"),
        ({"env": {"1BAD": "v"}}, "invalid environment variable name"),
        ({"ssh_public_key": "ssh-ed25519 AAA a\nssh-ed25519 BBB b"}, "exactly one SSH public key"),
        ({"image": 'img"; evil'}, "quotes"),
    ],
)
def test_unsafe_values_are_refused_before_any_call(sim, cloud, keypair, name, change, message):
    before = len(sim.world.events)
    with pytest.raises(InvalidRequest, match=message):
        cloud.launch(LaunchSpec(**{**vars(spec(name, keypair)), **change}))
    assert len(sim.world.events) == before


def test_unknown_gpu_type_lists_the_valid_ones(cloud, keypair, name):
    with pytest.raises(InvalidRequest, match="unknown RunPod GPU type 'NVIDIA B9000'.*NVIDIA GeForce RTX 4090"):
        cloud.launch(LaunchSpec(name=name, instance_type="NVIDIA B9000", ssh_public_key=keypair.public))


def test_no_capacity_is_a_capacity_error(sim, cloud, keypair, name):
    sim.set_capacity("runpod", "NVIDIA GeForce RTX 4090", 0)
    try:
        assert all(not o.regions for o in cloud.offers() if o.instance_type == "NVIDIA GeForce RTX 4090")
        with pytest.raises(CapacityError, match="no longer any instances available"):
            cloud.launch(spec(name, keypair))
    finally:
        sim.set_capacity("runpod", "NVIDIA GeForce RTX 4090", DEFAULT_CAPACITY)
    assert own_instances(sim, name) == []


def test_a_create_that_answers_an_unknown_error_after_making_the_pod_adopts_it_and_destroy_ends_it(sim, sim_env, keypair, name):
    from gpu_session.providers import GpuInstanceProvider
    from gpu_session.providers.instance import OUTPUTS

    sim.inject("runpod:podFindAndDeployOnDemand", "error_after_create")  # a 500 with a message no rule knows
    p = GpuInstanceProvider()
    props = {"cloud": "runpod", "name": name, "gpu_type": "NVIDIA GeForce RTX 4090", "gpu_count": 1,
             "ssh_public_key": keypair.public, "ready_timeout_s": 60, **dict.fromkeys(OUTPUTS)}  # fmt: skip
    created = p.create(props)
    [pod] = own_instances(sim, name)  # exactly one, and it is the one the stack records: no orphan
    assert pod["id"] == created.id and [e["event"] for e in sim.world.events if e.get("name") == name] == ["launch"]
    p.delete(created.id, created.outs)
    sim.wait_gone(created.id)
    assert own_instances(sim, name) == []


def test_only_a_refusal_we_know_counts_as_nothing_made():
    from gpu_session.clouds import CloudError
    from gpu_session.clouds.runpod import _classify

    assert isinstance(_classify("imageName is required when no templateId is given."), InvalidRequest)
    unknown = _classify("failed to attach pod to machine: context deadline exceeded")
    assert type(unknown) is CloudError and "do not know" in str(unknown)


# --- the unmodified SDK ---------------------------------------------------------------------


@pytest.fixture
def sdk(sim_env, sim):
    runpod.api_key = sim.runpod_key
    yield runpod
    runpod.api_key = None


def test_unmodified_sdk_round_trip(sim, sdk, keypair, name):
    gpus = sdk.get_gpus()
    assert {"id": "NVIDIA RTX A6000", "displayName": "RTX A6000", "memoryInGb": 48} in gpus
    assert sdk.get_gpu("NVIDIA L40S")["lowestPrice"]["uninterruptablePrice"] == pytest.approx(0.79)
    pod = sdk.create_pod(name, "runpod/base:0.0.0", "NVIDIA RTX A6000", cloud_type="SECURE", ports="22/tcp",
                         env={"PUBLIC_KEY": keypair.public})  # fmt: skip
    assert pod["imageName"] == "runpod/base:0.0.0" and f"PUBLIC_KEY={keypair.public}" in pod["env"]
    deadline = time.monotonic() + 30
    while not (got := sdk.get_pod(pod["id"]))["runtime"] and time.monotonic() < deadline:
        time.sleep(0.05)
    [port] = [p for p in got["runtime"]["ports"] if p["privatePort"] == 22]
    assert port["isIpPublic"] and port["type"] == "tcp"
    assert got["desiredStatus"] == "RUNNING" and got["machine"] == {"gpuDisplayName": "RTX A6000"}
    assert any(p["id"] == pod["id"] for p in sdk.get_pods())
    out = ssh(SshEndpoint(port["ip"], port["publicPort"], "root"), keypair, "hostname")
    assert out.returncode == 0, out.stderr
    assert sdk.terminate_pod(pod["id"]) is None
    assert sdk.get_pod(pod["id"]) is None
    sim.wait_gone(pod["id"])
    with pytest.raises(runpod.error.QueryError, match="pod not found to terminate"):
        sdk.terminate_pod(pod["id"])


def test_unmodified_sdk_errors(sdk):
    with pytest.raises(ValueError):
        sdk.create_pod("x", "img", "NVIDIA B9000")  # the SDK's own check: the GPU query returns []
    runpod.api_key = "bad"
    with pytest.raises(runpod.error.AuthenticationError):
        sdk.get_pods()


def test_pod_scoped_key_can_terminate_its_own_pod_only(sim, cloud, keypair, name):
    a = cloud.launch(spec(name + "a", keypair))
    b = cloud.launch(spec(name + "b", keypair))
    endpoint = cloud.wait_ready(a, time.monotonic() + 30)
    # From inside pod a, with the key the platform injected, as the lease watchdog will do.
    script = (
        "import json, os, urllib.request\n"
        "def q(doc):\n"
        "    req = urllib.request.Request(os.environ['RUNPOD_API_BASE_URL'] + '/graphql', json.dumps({'query': doc}).encode(),\n"
        "        {'Content-Type': 'application/json', 'Authorization': 'Bearer ' + os.environ['RUNPOD_API_KEY']})\n"
        "    return json.load(urllib.request.urlopen(req))\n"
        f"print(json.dumps(q('mutation {{ podTerminate(input: {{podId: \"{b}\"}}) }}')))\n"
        "print(json.dumps(q('query { myself { pods { id } } }')))\n"
        "print(json.dumps(q('mutation { podTerminate(input: {podId: \"' + os.environ['RUNPOD_POD_ID'] + '\"}) }')), flush=True)\n"
    )
    out = ssh(endpoint, keypair, f"python3 -c {shlex.quote(script)}")
    # The pod goes down right after answering, which may cut the connection: what arrived must agree.
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) >= 2, out.stderr
    assert lines[0]["errors"][0]["path"] == ["podTerminate"] and "not authorized" in lines[0]["errors"][0]["message"]
    assert lines[1]["errors"][0]["path"] == ["myself"]
    assert lines[2:] in ([], [{"data": {"podTerminate": None}}])
    sim.wait_gone(a)
    assert cloud.get(b).alive  # the other pod was untouched
    cloud.terminate_and_wait(b, time.monotonic() + 30)


# --- the wire contract of the simulator itself ----------------------------------------------


@pytest.fixture
def gql(sim):
    def call(query, key=None, via_query_param=False):
        url = sim.url + "/graphql"
        if via_query_param:
            return requests.post(url, params={"api_key": key or sim.runpod_key}, json={"query": query}, timeout=10)
        return requests.post(url, headers={"Authorization": f"Bearer {key or sim.runpod_key}"}, json={"query": query}, timeout=10)

    return call


def test_graphql_errors(gql):
    assert gql("query { myself { id } }", via_query_param=True).json() == {"data": {"myself": {"id": "sim-user"}}}
    assert gql("query { myself { id } }", key="bad").status_code == 401
    syntax = gql("query { myself { id ")
    assert syntax.status_code == 400 and "Syntax Error" in syntax.json()["errors"][0]["message"]
    unknown = gql("query { myself { nonsense } }")
    assert unknown.status_code == 400 and "nonsense" in unknown.json()["errors"][0]["message"]
    missing = gql('mutation { podFindAndDeployOnDemand(input: {name: "x", gpuTypeId: "NVIDIA L40S"}) { id } }')
    assert missing.status_code == 200
    assert missing.json()["errors"][0]["path"] == ["podFindAndDeployOnDemand"]
    assert "imageName" in missing.json()["errors"][0]["message"]
    gone = gql('mutation { podTerminate(input: {podId: "nonexistent0000"}) }').json()
    assert gone["errors"][0]["message"] == "pod not found to terminate" and gone["data"] == {"podTerminate": None}
    assert gql('query { pod(input: {podId: "nonexistent0000"}) { id } }').json() == {"data": {"pod": None}}


def test_unmodified_sdk_stop_and_resume(sim, sdk, keypair, name):
    pod = sdk.create_pod(name, "runpod/base:0.0.0", "NVIDIA RTX A5000", ports="22/tcp", env={"PUBLIC_KEY": keypair.public})
    deadline = time.monotonic() + 30
    while not sdk.get_pod(pod["id"])["runtime"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sdk.stop_pod(pod["id"]) == {"id": pod["id"], "desiredStatus": "EXITED"}
    stopped = sdk.get_pod(pod["id"])
    assert stopped["desiredStatus"] == "EXITED" and stopped["runtime"] is None and not sim.host_pids(pod["id"])
    assert sdk.resume_pod(pod["id"], 1)["desiredStatus"] == "RUNNING"
    while not sdk.get_pod(pod["id"])["runtime"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sdk.get_pod(pod["id"])["runtime"]["ports"][0]["privatePort"] == 22
    sdk.terminate_pod(pod["id"])
    sim.wait_gone(pod["id"])


def test_graphql_unknown_gpu_type_and_bad_input(gql):
    assert gql('query { gpuTypes(input: {id: "NVIDIA B9000"}) { id } }').json() == {"data": {"gpuTypes": []}}
    deploy = 'mutation {{ podFindAndDeployOnDemand(input: {{name: "x", imageName: "i", gpuTypeId: "{}"{}}}) {{ id }} }}'
    unknown = gql(deploy.format("NVIDIA B9000", "")).json()
    assert unknown["errors"][0]["message"].startswith("There are no longer any instances available")
    assert unknown["errors"][0]["path"] == ["podFindAndDeployOnDemand"]
    ports = gql(deploy.format("NVIDIA L40S", ', ports: "22/udp"')).json()
    assert "Invalid ports" in ports["errors"][0]["message"]
    env = gql(deploy.format("NVIDIA L40S", ', env: [{key: "1X", value: "v"}]')).json()
    assert "Invalid environment variable name" in env["errors"][0]["message"]
    enum = gql(deploy.format("NVIDIA L40S", ", cloudType: EVERYWHERE"))
    assert enum.status_code == 400 and "EVERYWHERE" in enum.json()["errors"][0]["message"]
