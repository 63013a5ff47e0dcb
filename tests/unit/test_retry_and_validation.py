"""Pure parts of the cloud layer: backoff, retry decisions, name checks, error classification."""

from __future__ import annotations

import socket

import pytest

from gpu_session.clouds import (
    AuthError,
    CapacityError,
    CloudError,
    InvalidRequest,
    NotFound,
    RateLimited,
    RetryPolicy,
    get_cloud,
)
from gpu_session.clouds.base import ssh_banner, validate_name, with_retries
from gpu_session.clouds.runpod import _classify


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    policy = RetryPolicy(attempts=7, base=1.0, cap=8.0)
    for _ in range(50):
        delays = list(policy.delays())
        assert len(delays) == 6
        for n, d in enumerate(delays):
            bound = min(8.0, 2.0**n)
            assert bound / 2 <= d <= bound
    assert len({tuple(policy.delays()) for _ in range(20)}) > 1  # jittered


def test_a_start_polls_sooner_first_and_never_faster_than_the_cloud_allows():
    from itertools import islice

    from gpu_session.clouds.lambda_cloud import LambdaCloud
    from gpu_session.clouds.runpod import RunpodCloud

    # Lambda documents one request a second: its retry floor holds the first polls to that.
    assert list(islice(LambdaCloud(api_key="k").poll_delays(), 5)) == [1.0, 1.0, 2.0, 2.0, 2.0]
    assert list(islice(RunpodCloud(api_key="k").poll_delays(), 5)) == [0.5, 1.0, 2.0, 2.0, 2.0]
    assert list(islice(RunpodCloud(api_key="k", poll_interval=8.0).poll_delays(), 4)) == [2.0, 4.0, 8.0, 8.0]


def test_only_retryable_errors_are_retried(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RateLimited("slow down")
        return "ok"

    assert with_retries(flaky, RetryPolicy(attempts=5), "x") == "ok" and len(calls) == 3

    calls.clear()

    def broken():
        calls.append(1)
        raise InvalidRequest("bad")

    with pytest.raises(InvalidRequest):
        with_retries(broken, RetryPolicy(attempts=5), "x")
    assert len(calls) == 1

    calls.clear()

    def down():
        calls.append(1)
        raise CloudError("503", retryable=True)

    with pytest.raises(CloudError):
        with_retries(down, RetryPolicy(attempts=4), "x")
    assert len(calls) == 4


@pytest.mark.parametrize("ok", ["a", "gpu-session-dev-gpu", "x.y_z-1", "A" * 64])
def test_valid_names(ok):
    validate_name(ok)


@pytest.mark.parametrize("bad", ["", " a", "a b", 'a"b', "a\\b", "a\nb", "-a", "é", "A" * 65, "a;rm -rf /"])
def test_invalid_names(bad):
    with pytest.raises(InvalidRequest):
        validate_name(bad)


@pytest.mark.parametrize(
    "message, kind, retryable",
    [
        ("There are no longer any instances available with the requested specifications. Please refresh and try again.", CapacityError, False),
        ("pod not found to terminate", NotFound, False),
        ("Something went wrong. Please try again later or contact support.", CloudError, True),
        ("Too many requests. Please slow down and try again later.", RateLimited, True),
        ("You are not authorized to perform this action on this pod.", AuthError, False),
        ("Invalid ports: 22", InvalidRequest, False),
    ],
)  # fmt: skip
def test_runpod_messages_become_typed_errors(message, kind, retryable):
    err = _classify(message)
    assert type(err) is kind and err.retryable is retryable


def test_capacity_error_names_what_is_available():
    err = CapacityError("No A100.", ["gpu_1x_h100_pcie in us-west-1"])
    assert str(err) == "No A100. Available now: gpu_1x_h100_pcie in us-west-1."


def test_unknown_cloud():
    with pytest.raises(InvalidRequest, match="lambda, runpod"):
        get_cloud("aws")


def test_ssh_banner_is_false_on_a_closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert ssh_banner("127.0.0.1", port, timeout=0.5) is False


def test_a_stopped_simulator_is_said_at_once_a_dropped_connection_is_retried(monkeypatch):
    """Nothing listens at a loopback address (a simulator that is not running): the clients say so
    on the first refusal instead of retrying for half a minute. Elsewhere no answer is retried."""
    import requests

    from gpu_session.clouds.base import unreachable
    from gpu_session.clouds.lambda_cloud import LambdaCloud
    from gpu_session.clouds.runpod import RunpodCloud

    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("RUNPOD_API_BASE_URL", base)  # the RunPod client sets it for the SDK: put back after
        never = RetryPolicy(attempts=1)  # a retryable error would surface as retryable
        for client, call in (
            (LambdaCloud(api_key="k", base_url=f"{base}/api/v1", retry=never), "offers"),
            (RunpodCloud(api_key="k", base_url=base, rest_base_url=f"{base}/v1", retry=never), "offers"),
            (RunpodCloud(api_key="k", base_url=base, rest_base_url=f"{base}/v1", retry=never), "volumes"),
        ):
            with pytest.raises(CloudError, match=f"nothing listens at 127.0.0.1:{port}: no simulator runs there now") as raised:
                getattr(client, call)()
            assert not raised.value.retryable
    dropped = requests.ConnectionError(
        "Connection aborted.", request=requests.Request("GET", "https://cloud.lambda.ai/api/v1/x").prepare()
    )
    assert unreachable("Lambda API GET /x", dropped).retryable
    timed_out = requests.Timeout("read timed out", request=requests.Request("GET", f"{base}/x").prepare())
    assert unreachable("Lambda API GET /x", timed_out).retryable  # a busy simulator: asked again
