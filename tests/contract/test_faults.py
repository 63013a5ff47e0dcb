"""Every injected fault ends in a retry that succeeds or in a typed error, and never in a leaked
or doubled instance: each test lists the simulator's instances at the end and finds none of its own."""

from __future__ import annotations

import time

import pytest
from conftest import FAST_RETRY, own_instances, ssh

from gpu_session.clouds import CapacityError, CloudError, LaunchSpec, NotReady, RateLimited, RetryPolicy, Status
from gpu_session.clouds.lambda_cloud import LambdaCloud
from gpu_session.clouds.runpod import RunpodCloud

LAUNCH = {"lambda": "instance-operations/launch", "runpod": "podFindAndDeployOnDemand"}
GET = {"lambda": "instances/{id}", "runpod": "pod"}
LIST = {"lambda": "instances", "runpod": "myself"}
TERMINATE = {"lambda": "instance-operations/terminate", "runpod": "podTerminate"}


@pytest.fixture(params=["lambda", "runpod"])
def cloud(request, sim_env):
    if request.param == "lambda":
        return LambdaCloud(retry=FAST_RETRY, launch_interval=0, poll_interval=0.05, timeout=1.0)
    return RunpodCloud(retry=FAST_RETRY, poll_interval=0.05)


@pytest.fixture
def spec(cloud, keypair, name):
    if cloud.name == "lambda":
        key = cloud.register_ssh_key(f"{name}-key", keypair.public)
        yield LaunchSpec(name=name, instance_type="gpu_1x_a10", ssh_key_name=key.name)
        cloud.delete_ssh_key(key.id)
    else:
        yield LaunchSpec(name=name, instance_type="NVIDIA GeForce RTX 4090", ssh_public_key=keypair.public)


def launches(sim, name) -> int:
    return sum(1 for e in sim.world.events if e["event"] == "launch" and e.get("name") == name)


def full_cycle(sim, cloud, spec, keypair) -> str:
    iid = cloud.launch(spec)
    endpoint = cloud.wait_ready(iid, time.monotonic() + 30)
    assert ssh(endpoint, keypair, "true").returncode == 0
    cloud.terminate_and_wait(iid, time.monotonic() + 30)
    sim.wait_gone(iid)
    return iid


def assert_clean(sim, name, launched: int) -> None:
    assert own_instances(sim, name) == []
    assert launches(sim, name) == launched, "a launch was retried blindly"


@pytest.mark.parametrize(
    "op, kind, times",
    [
        (LAUNCH, "429", 2),  # a burst of rate limiting
        (LAUNCH, "500", 1),
        (LAUNCH, "503", 2),
        (LAUNCH, "502", 1),
        (LAUNCH, "slow", 1),
        (LAUNCH, "error_after_create", 1),  # created, then answered 500: adopted, not launched twice
        (LAUNCH, "drop", 1),  # created, connection closed: adopted
        (GET, "500", 3),
        (GET, "429", 3),
        (LIST, "503", 2),
        (TERMINATE, "503", 2),
        (TERMINATE, "drop", 1),
        (TERMINATE, "error_after_create", 1),  # ended, then answered an error: looked at, not retried into an error
    ],
)
def test_transient_faults_are_retried_to_success(sim, cloud, spec, keypair, name, op, kind, times):
    sim.inject(f"{cloud.name}:{op[cloud.name]}", kind, times=times, delay=0.5)
    full_cycle(sim, cloud, spec, keypair)
    assert_clean(sim, name, launched=1)


def test_launch_timeout_is_resolved_by_looking_the_name_up(sim, sim_env, keypair, name):
    cloud = LambdaCloud(retry=FAST_RETRY, launch_interval=0, poll_interval=0.05, timeout=0.5)
    key = cloud.register_ssh_key(f"{name}-key", keypair.public)
    sim.inject("lambda:instance-operations/launch", "timeout", delay=1.5)
    full_cycle(sim, cloud, LaunchSpec(name=name, instance_type="gpu_1x_a10", ssh_key_name=key.name), keypair)
    cloud.delete_ssh_key(key.id)
    assert_clean(sim, name, launched=1)


def test_capacity_error_is_typed_and_leaves_nothing(sim, cloud, spec, name):
    sim.inject(f"{cloud.name}:{LAUNCH[cloud.name]}", "capacity")
    with pytest.raises(CapacityError):
        cloud.launch(spec)
    assert_clean(sim, name, launched=0)


def test_persistent_errors_end_in_a_typed_error_without_an_instance(sim, cloud, spec, name):
    sim.inject(f"{cloud.name}:{LAUNCH[cloud.name]}", "503", times=FAST_RETRY.attempts)
    with pytest.raises(CloudError) as err:
        cloud.launch(spec)
    assert err.value.retryable
    assert_clean(sim, name, launched=0)


def test_rate_limited_beyond_patience_is_typed(sim, cloud, spec, name):
    cloud.retry = RetryPolicy(attempts=2, base=0.01, cap=0.02)
    sim.inject(f"{cloud.name}:{GET[cloud.name]}", "429", times=2)
    with pytest.raises(RateLimited):
        cloud.get("whatever0000000")
    assert_clean(sim, name, launched=0)


def test_instance_that_dies_while_starting_is_reported_and_cleaned(sim, cloud, spec, name):
    sim.world.config.boot_delay = 1.0
    try:
        iid = cloud.launch(spec)
        sim.kill_instance(iid)
        with pytest.raises(NotReady, match="instead of starting"):
            cloud.wait_ready(iid, time.monotonic() + 30)
    finally:
        sim.world.config.boot_delay = 0.3
    cloud.terminate_and_wait(iid, time.monotonic() + 30)
    sim.wait_gone(iid)
    assert_clean(sim, name, launched=1)


def test_instance_that_turns_unhealthy_is_seen_and_terminated(sim, cloud, spec, keypair, name):
    iid = cloud.launch(spec)
    endpoint = cloud.wait_ready(iid, time.monotonic() + 30)
    sim.make_unhealthy(iid)
    assert ssh(endpoint, keypair, "true", timeout=15).returncode != 0
    inst = cloud.get(iid)
    assert inst.alive and inst.status in (Status.UNHEALTHY, Status.PENDING)  # RunPod: RUNNING without runtime
    cloud.terminate_and_wait(iid, time.monotonic() + 30)
    sim.wait_gone(iid)
    assert_clean(sim, name, launched=1)
