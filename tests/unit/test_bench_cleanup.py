"""The benchmarks leave nothing behind when a session fails: down ends what the failed up made, the
cache bench's volume goes, and the error shown is the one that stopped the bench (a refused
`cache rm` of a volume still in use used to replace it, with the session left up)."""

from __future__ import annotations

import pytest

from gpu_session.cli import bench
from gpu_session.session import cache, down, up
from gpu_session.session.plan import SessionError


@pytest.fixture
def calls(monkeypatch):
    done: list[str] = []

    def failed_up(*_, **__):
        done.append("up")
        raise SessionError("the converge failed: Wait for the download")

    monkeypatch.setattr(up, "up", failed_up)
    monkeypatch.setattr(down, "down", lambda stack, **_: done.append(f"down {stack}"))
    monkeypatch.setattr(cache, "create", lambda cloud, region, *_, **__: done.append(f"create {cloud} {region}"))
    monkeypatch.setattr(cache, "rm", lambda cloud, region, **_: done.append(f"rm {cloud} {region}"))
    return done


def test_a_failed_up_in_the_cache_bench_is_ended_and_its_cache_deleted(calls):
    with pytest.raises(SessionError, match="Wait for the download"):
        bench.run_cache("transformers", "runpod", say=lambda _: None)
    assert calls == ["create runpod EU-RO-1", "up", f"down {bench.STACK}", "rm runpod EU-RO-1"]


def test_a_cache_that_cannot_go_is_said_and_the_first_error_stays(calls, monkeypatch):
    said = []

    def refused(cloud, region, **_):
        raise cache.CacheError(f"cache {cloud} {region} is in use by session stack bench")

    monkeypatch.setattr(cache, "rm", refused)
    with pytest.raises(SessionError, match="Wait for the download"):
        bench.run_cache("transformers", "runpod", say=said.append)
    assert any("cache.rm --cloud runpod --region EU-RO-1 --yes" in s and "in use" in s for s in said), said


def test_a_down_that_fails_after_a_failed_up_is_said_and_the_first_error_stays(calls, monkeypatch):
    said = []

    def broken(stack, **_):
        raise SessionError("scrub failed: the host does not answer")

    monkeypatch.setattr(down, "down", broken)
    with pytest.raises(SessionError, match="Wait for the download"):
        bench.run("transformers", "lambda", say=said.append)
    assert any("does not answer" in s and f"down --stack {bench.STACK}" in s for s in said), said


def test_a_failed_up_in_the_session_bench_is_ended(calls):
    with pytest.raises(SessionError, match="Wait for the download"):
        bench.run("transformers", "lambda", say=lambda _: None)
    assert calls == ["up", f"down {bench.STACK}"]
