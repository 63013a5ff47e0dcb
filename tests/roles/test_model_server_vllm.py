"""model_server with vLLM (its CPU build) on a simulator host: converged once through site.yml,
then checked from outside like testinfra would, and converged again to prove nothing changes."""

from __future__ import annotations

import json

import pytest
from conftest import on
from serving import TINY_TEXT, call, check_private_server, converge, site_vars

from gpu_session.configure import ConfigureError


@pytest.fixture(scope="module")
def served(sim, hosts):
    target = hosts["lambda"]  # ubuntu + sudo: every task goes through become
    extravars = site_vars(sim, TINY_TEXT, "vllm")
    events = []
    result = converge(target, extravars, events)
    return target, extravars, result, events


def test_serves_the_model_on_loopback_only_behind_the_key(served, keypair):
    target, v, result, events = served
    assert result.facts["model_server_served_model_name"] == TINY_TEXT
    check_private_server(target, keypair, v["model_server_api_key"], TINY_TEXT, "vllm.entrypoints.openai.api_server", events)
    status, body = call(target, keypair, "/v1/chat/completions", v["model_server_api_key"],
                        {"model": TINY_TEXT, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5})  # fmt: skip
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]


def test_a_second_converge_changes_nothing(served):
    target, v, _, _ = served
    assert converge(target, v).changed == 0


def test_a_model_id_that_would_inject_shell_is_refused(served, keypair):
    target, v, _, _ = served
    with pytest.raises(ConfigureError, match="Hub id like owner/name"):
        converge(target, {**v, "model_server_model": "a/b; touch /tmp/pwned"})
    assert on(target, keypair, "ls /tmp/pwned 2>/dev/null || echo absent").strip() == "absent"


def test_a_gated_model_without_a_token_says_what_to_do(served):
    target, v, _, _ = served
    with pytest.raises(ConfigureError, match="is gated: accept its license .* give an HF token"):
        converge(target, {**v, "model_server_model": "meta-llama/Llama-3.2-1B-Instruct"})


def test_a_model_too_big_fails_before_any_download_naming_need_and_have(served, sim, keypair):
    target, v, _, _ = served
    big = "meta-llama/Llama-3.1-70B-Instruct"
    with pytest.raises(ConfigureError, match=r"needs 157\.\d GB of GPU memory; this host has 24\.0 GB \(1 x NVIDIA A10 24GB\)"):
        converge(target, {**v, "model_server_model": big, "model_server_hf_token": sim.hf_token})
    assert "Llama-3.1-70B" not in on(target, keypair, "sudo ls -R /opt/gpu-session/hf")


def test_extra_arguments_are_passed_quoted_and_a_failed_start_shows_the_log(served, keypair):
    """Last: it leaves the server stopped."""
    target, v, _, _ = served
    with pytest.raises(ConfigureError, match=r"(?s)not ready \(Wait for the port.*the model server exited.*--seed") as err:
        converge(target, {**v, "model_server_extra_args": ["--seed", "1; touch /tmp/pwned-extra"]})
    assert "invalid int value: '1; touch /tmp/pwned-extra'" in str(err.value)
    assert on(target, keypair, "ls /tmp/pwned-extra 2>/dev/null || echo absent").strip() == "absent"
    assert v["model_server_api_key"] not in str(err.value)
