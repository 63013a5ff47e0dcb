"""A private model server: on 127.0.0.1:8000 and no other address, nothing without the key, the
secrets in 0600 files of the service user and in no process's arguments, and it answers."""

import json
import os
import time
from pathlib import Path

import testinfra.utils.ansible_runner

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"]).get_hosts("all")
KEY = (Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "api_key").read_text().strip()
MODEL = os.environ["MODEL_SERVER_MODEL"]


def request(host, path, key=None, body=None):
    """curl on the host (the port is reachable nowhere else): (status, body)."""
    args = ["curl", "-s", "--max-time", "120", "-w", "\n%{http_code}"]
    args += ["-H", f"Authorization: Bearer {key}"] if key else []
    args += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)] if body is not None else []
    out = host.check_output(" ".join(["%s"] * (len(args) + 1)), *args, f"http://127.0.0.1:8000{path}")
    text, _, status = out.rpartition("\n")
    return int(status), text


def test_listens_on_loopback_only(host):
    assert host.socket("tcp://127.0.0.1:8000").is_listening
    with host.sudo():
        listeners = host.check_output("ss -Htln 'sport = :8000'").splitlines()
    assert [line.split()[3] for line in listeners] == ["127.0.0.1:8000"]


def test_refuses_requests_without_the_key(host):
    assert request(host, "/v1/models")[0] == 401
    assert request(host, "/v1/models", key="x" * 40)[0] == 401
    status, body = request(host, "/v1/chat/completions", body={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 401 and "choices" not in body


def test_lists_and_serves_the_model_with_the_key(host):
    status, body = request(host, "/v1/models", KEY)
    assert status == 200 and MODEL in [m["id"] for m in json.loads(body)["data"]]
    status, body = request(
        host, "/v1/chat/completions", KEY, {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    )
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] is not None


def test_says_its_context_length_where_the_chat_reads_it(host):
    """The chat trims a conversation to the context the server enforces: vLLM gives it with the model
    (max_model_len, read through the openai types as the chat reads it); transformers serve does not,
    and the chat asks the Hub instead."""
    from openai.types import Model

    status, body = request(host, "/v1/models", KEY)
    # construct, as the client does: it does not validate (transformers serve's `created` is a float)
    [served] = [Model.construct(**m) for m in json.loads(body)["data"] if m["id"] == MODEL]
    length = (served.model_extra or {}).get("max_model_len")
    assert length == (2048 if os.environ["MODEL_SERVER_BACKEND"] == "vllm" else None)


def test_secrets_live_in_private_files_only(host):
    with host.sudo():
        for path in ("/opt/gpu-session/env", "/opt/gpu-session/model-server.env"):
            f = host.file(path)
            assert (f.mode, f.user, f.group) == (0o640, "root", "gpu-session"), path
        assert KEY in host.file("/opt/gpu-session/model-server.env").content_string
        args = host.check_output("ps -eo args")
    assert "127.0.0.1" in args and KEY not in args


def test_runs_as_the_service_user(host):
    with host.sudo():
        pid = host.file("/run/gpu-session/gpu-session-model-server.pid").content_string.strip()
    assert host.check_output("ps -o user= -p %s", pid) == "gpu-session"


def test_the_lease_watchdog_sees_a_healthy_server(host):
    """The watchdog starts while the engine loads (site.yml) and checks every second until the server
    first answers: its status says healthy within a few of its checks after the converge."""
    for _ in range(10):
        with host.sudo():
            status = json.loads(host.file("/run/gpu-session/status.json").content_string)
        if status["server"] == "healthy":
            break
        time.sleep(1)
    assert status["state"] == "active" and status["server"] == "healthy"
