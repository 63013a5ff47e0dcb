"""The Lambda Cloud client against the simulator over HTTP, and the simulator's wire contract."""

from __future__ import annotations

import base64
import subprocess
import time

import pytest
import requests
from conftest import FAST_RETRY, own_instances, ssh

from gpu_session.clouds import AuthError, CapacityError, InvalidRequest, LaunchSpec, NotFound, RateLimited, Status
from gpu_session.clouds.lambda_cloud import LambdaCloud
from gpu_session.sim.catalog import DEFAULT_CAPACITY


@pytest.fixture
def cloud(sim_env) -> LambdaCloud:
    return LambdaCloud(retry=FAST_RETRY, launch_interval=0, poll_interval=0.05, timeout=5)


@pytest.fixture
def key(cloud, keypair, name):
    k = cloud.register_ssh_key(f"{name}-key", keypair.public)
    yield k
    try:
        cloud.delete_ssh_key(k.id)
    except NotFound:
        pass


def test_offers_show_types_prices_and_capacity(cloud):
    offers = {o.instance_type: o for o in cloud.offers()}
    h100 = offers["gpu_8x_h100_sxm5"]
    assert (h100.gpu_name, h100.gpu_count, h100.vram_gb, h100.total_vram_gb) == ("H100", 8, 80, 640)
    assert h100.price_per_hour == pytest.approx(23.92)
    assert "us-east-1" in offers["gpu_1x_a10"].regions and not offers["gpu_1x_a10"].spot


def test_launch_ssh_list_terminate_and_host_gone(sim, cloud, key, keypair, name):
    iid = cloud.launch(LaunchSpec(name=name, instance_type="gpu_1x_a10", ssh_key_name=key.name))
    endpoint = cloud.wait_ready(iid, time.monotonic() + 30)
    assert endpoint.user == "ubuntu" and endpoint.port == 22

    query = "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader"
    out = ssh(endpoint, keypair, f"whoami && sudo -n whoami && {query}")
    assert out.returncode == 0, out.stderr
    # What an A10 reports (less than the 24 GB sold), and a recent driver
    assert out.stdout.splitlines() == ["ubuntu", "root", "NVIDIA A10 24GB, 23028 MiB, 580.95.05"]
    ssh(endpoint, keypair, "nohup sleep 600 >/dev/null 2>&1 & echo data > /home/ubuntu/file")
    assert sim.host_pids(iid), "the host should have processes"

    listed = cloud.list(name)
    assert [(i.id, i.status, i.region, i.gpu_name) for i in listed] == [(iid, Status.RUNNING, "us-east-1", "A10")]
    assert listed[0].price_per_hour == pytest.approx(0.75)

    cloud.terminate_and_wait(iid, time.monotonic() + 30)
    sim.wait_gone(iid)
    assert sim.host_pids(iid) == [] and not sim.host_dir(iid).exists()
    assert own_instances(sim, name) == []
    with pytest.raises(NotFound):
        cloud.get(iid)
    cloud.terminate_and_wait(iid, time.monotonic() + 5)  # already gone is success


def test_second_launch_with_same_name_adopts(sim, cloud, key, name):
    first = cloud.launch(LaunchSpec(name=name, instance_type="gpu_1x_a10", ssh_key_name=key.name))
    second = cloud.launch(LaunchSpec(name=name, instance_type="gpu_1x_a10", ssh_key_name=key.name))
    assert first == second and len(own_instances(sim, name)) == 1
    cloud.terminate_and_wait(first, time.monotonic() + 30)


def test_a_terminate_while_terminating_succeeds_and_the_instance_ends(sim, cloud, key, raw, name, monkeypatch):
    iid = cloud.launch(LaunchSpec(name=name, instance_type="gpu_1x_a10", ssh_key_name=key.name))
    cloud.wait_ready(iid, time.monotonic() + 30)
    monkeypatch.setattr(sim.world.config, "terminate_delay", 600.0)  # held in `terminating` until killed below
    cloud.terminate(iid)
    assert cloud.get(iid).status == Status.TERMINATING
    again = raw("POST", "/instance-operations/terminate", {"instance_ids": [iid]})
    assert (again.status_code, again.json()["error"]["code"]) == (500, "global/unknown")  # what Lambda answers
    cloud.terminate(iid)  # a second destroy, while the first is under way: no error
    sim.kill_instance(iid)  # the terminating phase ends
    cloud.terminate_and_wait(iid, time.monotonic() + 30)  # terminated, then gone: both are success
    sim.wait_gone(iid)
    assert own_instances(sim, name) == []


def test_host_key_from_user_data_is_pinned(sim, cloud, key, keypair, name, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "hostkey")], check=True)
    private, public = (tmp_path / "hostkey").read_text(), (tmp_path / "hostkey.pub").read_text().strip()
    user_data = "#cloud-config\nwrite_files:\n" + "".join(
        f"  - path: {path}\n    permissions: '{mode}'\n    encoding: b64\n    content: {base64.b64encode(data.encode()).decode()}\n"
        for path, data, mode in (
            ("/etc/ssh/ssh_host_ed25519_key", private, "0600"),
            ("/etc/ssh/ssh_host_ed25519_key.pub", public + "\n", "0644"),
        )
    )
    iid = cloud.launch(LaunchSpec(name=name, instance_type="gpu_1x_a10", ssh_key_name=key.name, user_data=user_data))
    endpoint = cloud.wait_ready(iid, time.monotonic() + 30)
    known = tmp_path / "known_hosts"
    known.write_text(f"{endpoint.host} {public}\n")
    out = ssh(endpoint, keypair, "true", known_hosts=known, strict=True)
    assert out.returncode == 0, out.stderr
    known.write_text(f"{endpoint.host} {keypair.public}\n")  # any other key: ssh must refuse
    assert ssh(endpoint, keypair, "true", known_hosts=known, strict=True).returncode != 0
    cloud.terminate_and_wait(iid, time.monotonic() + 30)


def test_ssh_keys_register_adopt_and_delete(sim, cloud, keypair, name):
    k = cloud.register_ssh_key(f"{name}-k", keypair.public)
    assert cloud.register_ssh_key(f"{name}-k", keypair.public) == k  # same key: adopted
    other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherOtherOtherOtherOtherOtherOtherOther x"
    with pytest.raises(InvalidRequest, match="already registered"):
        cloud.register_ssh_key(f"{name}-k", other)
    cloud.delete_ssh_key(k.id)
    assert all(x["name"] != k.name for x in sim.ssh_keys())
    with pytest.raises(NotFound):
        cloud.delete_ssh_key(k.id)


# --- bad input: refused before any call, or typed errors ------------------------------------


def test_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("LAMBDA_API_KEY", raising=False)
    with pytest.raises(AuthError, match="LAMBDA_API_KEY"):
        LambdaCloud()


def test_wrong_key_is_an_auth_error(sim_env):
    with pytest.raises(AuthError, match="global/invalid-api-key.*LAMBDA_API_KEY"):
        LambdaCloud(api_key="wrong", retry=FAST_RETRY).offers()


@pytest.mark.parametrize("bad", ["", "has space", 'quote"d', "x" * 65, "-leading-dash", "new\nline"])
def test_invalid_names_are_refused_before_any_call(sim, cloud, key, bad):
    before = len(sim.world.events)
    with pytest.raises(InvalidRequest, match="invalid name"):
        cloud.launch(LaunchSpec(name=bad, instance_type="gpu_1x_a10", ssh_key_name=key.name))
    assert len(sim.world.events) == before


def test_unknown_type_lists_the_valid_ones(cloud, key, name):
    with pytest.raises(InvalidRequest, match="unknown Lambda instance type 'gpu_1x_b9000'.*gpu_1x_a10"):
        cloud.launch(LaunchSpec(name=name, instance_type="gpu_1x_b9000", ssh_key_name=key.name))


def test_no_capacity_names_alternatives_and_spends_no_launch(sim, cloud, key, name):
    sim.set_capacity("lambda", "gpu_1x_a100_sxm4", 0)
    try:
        with pytest.raises(CapacityError) as err:
            cloud.launch(LaunchSpec(name=name, instance_type="gpu_1x_a100_sxm4", ssh_key_name=key.name))
        assert "gpu_1x_gh200 in" in str(err.value) and err.value.available
        assert not any(e["event"] == "launch" and e.get("name") == name for e in sim.world.events)
    finally:
        sim.set_capacity("lambda", "gpu_1x_a100_sxm4", DEFAULT_CAPACITY)
    assert own_instances(sim, name) == []


# --- the wire contract of the simulator itself ----------------------------------------------


@pytest.fixture
def raw(sim):
    base = sim.env()["LAMBDA_API_BASE"]

    def call(method, path, body=None, key=None, auth=None):
        headers = {"Authorization": auth or f"Bearer {key or sim.lambda_key}"}
        return requests.request(method, base + path, json=body, headers=headers, timeout=10)

    return call


def test_auth_forms_and_bad_key(sim, raw):
    basic = base64.b64encode(f"{sim.lambda_key}:".encode()).decode()
    assert raw("GET", "/instances", auth=f"Basic {basic}").status_code == 200
    assert raw("GET", "/instances", auth=f"Basic {sim.lambda_key}").status_code == 200
    r = raw("GET", "/instances", key="nope")
    assert r.status_code == 401 and r.json()["error"]["code"] == "global/invalid-api-key"


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"instance_type_name": "gpu_1x_a10", "ssh_key_names": ["k"]}, 400, "global/invalid-parameters"),
        ({"region_name": "us-east-1", "instance_type_name": "gpu_1x_a10", "ssh_key_names": ["a", "b"]}, 400, "global/invalid-parameters"),
        ({"region_name": "us-east-1", "instance_type_name": "gpu_1x_a10", "ssh_key_names": []}, 400, "global/invalid-parameters"),
        ({"region_name": "us-east-1", "instance_type_name": "nope", "ssh_key_names": ["k"]}, 404, "global/object-does-not-exist"),
        ({"region_name": "mars-1", "instance_type_name": "gpu_1x_a10", "ssh_key_names": ["k"]}, 404, "global/object-does-not-exist"),
        ({"region_name": "us-east-1", "instance_type_name": "gpu_1x_a10", "ssh_key_names": ["unregistered"]}, 404, "global/object-does-not-exist"),
        ({"region_name": "us-east-1", "instance_type_name": "gpu_1x_a10", "ssh_key_names": ["k"], "name": "x" * 65}, 400, "global/invalid-parameters"),
        ({"region_name": "us-east-1", "instance_type_name": "gpu_1x_a10", "ssh_key_names": ["k"], "hostname": "Bad_Host"}, 400, "global/invalid-parameters"),
    ],
)  # fmt: skip
def test_malformed_launches_get_the_real_error_codes(sim, raw, body, status, code):
    before = len(sim.instances())
    r = raw("POST", "/instance-operations/launch", body)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code)
    assert r.json()["error"]["message"]
    assert len(sim.instances()) == before


def test_terminate_unknown_and_missing_ids(raw):
    r = raw("POST", "/instance-operations/terminate", {"instance_ids": ["0" * 32]})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "global/object-does-not-exist")
    r = raw("POST", "/instance-operations/terminate", {})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "global/invalid-parameters")


def test_instance_types_are_an_object_keyed_by_name(raw):
    data = raw("GET", "/instance-types").json()["data"]
    assert isinstance(data, dict) and data["gpu_1x_a10"]["instance_type"]["price_cents_per_hour"] == 75
    assert {"name", "description"} <= set(data["gpu_1x_a10"]["regions_with_capacity_available"][0])


def test_ip_is_absent_while_booting(sim, raw, keypair, name, cloud, key):
    sim.world.config.boot_delay = 1.0
    try:
        iid = raw(
            "POST", "/instance-operations/launch",
            {"region_name": "us-west-1", "instance_type_name": "gpu_1x_a10", "ssh_key_names": [key.name], "name": name},
        ).json()["data"]["instance_ids"][0]  # fmt: skip
        booting = raw("GET", f"/instances/{iid}").json()["data"]
        assert booting["status"] == "booting" and "ip" not in booting
        assert booting["actions"]["restart"] == {
            "available": False, "reason_code": "vm-has-not-launched", "reason_description": "Instance is booting.",
        }  # fmt: skip
    finally:
        sim.world.config.boot_delay = 0.3
    cloud.wait_ready(iid, time.monotonic() + 30)
    active = raw("GET", f"/instances/{iid}").json()["data"]
    assert active["status"] == "active" and active["ip"]
    terminated = raw("POST", "/instance-operations/terminate", {"instance_ids": [iid]}).json()["data"]
    assert terminated["terminated_instances"][0]["status"] == "terminating"
    sim.wait_gone(iid)
    assert raw("GET", f"/instances/{iid}").status_code == 404


def test_rate_limits_answer_429_and_the_client_backs_off(sim, cloud):
    cfg = sim.world.config
    cfg.lambda_rate, cfg.lambda_burst = 20.0, 2
    try:
        codes = [requests.get(sim.env()["LAMBDA_API_BASE"] + "/regions", headers={"Authorization": f"Bearer {sim.lambda_key}"}).status_code for _ in range(6)]  # fmt: skip
        assert 429 in codes and codes[0] == 200
        assert len(cloud.offers()) > 0  # retried through the 429s
        impatient = LambdaCloud(retry=type(FAST_RETRY)(attempts=1), poll_interval=0.05)
        with pytest.raises(RateLimited):
            for _ in range(10):
                impatient.offers()
    finally:
        cfg.lambda_rate = 0


def test_default_retries_respect_the_documented_limits(sim, sim_env, key, name, monkeypatch):
    """Out of the box, a retry never comes sooner than 1 s, and a rate-limited launch waits 12 s."""
    import gpu_session.clouds.base as base

    slept, real_sleep = [], time.sleep
    monkeypatch.setattr(base.time, "sleep", lambda s: (slept.append(s), real_sleep(min(s, 0.01))))
    cloud = LambdaCloud(poll_interval=0.05)
    sim.inject("lambda:instance-types", "503")
    sim.inject("lambda:instance-operations/launch", "429")
    iid = cloud.launch(LaunchSpec(name=name, instance_type="gpu_1x_a10", ssh_key_name=key.name))
    # (later sleeps are the simulator's own boot timeline, which shares the patched clock)
    assert 1.0 <= slept[0] <= 2.0 and slept[1] >= 12.0
    assert len(own_instances(sim, name)) == 1
    cloud.terminate_and_wait(iid, time.monotonic() + 30)


def test_inactive_account_is_an_auth_error(sim, sim_env):
    sim.accept_key("lambda", "sim-lambda-inactive")
    sim.deactivate_key("sim-lambda-inactive")
    r = requests.get(sim.env()["LAMBDA_API_BASE"] + "/instances", headers={"Authorization": "Bearer sim-lambda-inactive"})
    assert (r.status_code, r.json()["error"]["code"]) == (403, "global/account-inactive")
    with pytest.raises(AuthError, match="account-inactive"):
        LambdaCloud(api_key="sim-lambda-inactive", retry=FAST_RETRY).offers()
