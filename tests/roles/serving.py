"""Helpers for the model-server tests: converge the site playbook once per module, call the server
through SSH on the host (its port is reachable nowhere else)."""

from __future__ import annotations

import json
import secrets
import shlex
from datetime import UTC, datetime, timedelta

from conftest import on

from gpu_session import engines
from gpu_session.configure import run

TINY_TEXT = "gpu-session/tiny-chat"
TINY_VISION = "gpu-session/tiny-vision"


def site_vars(sim, model: str, backend: str, **more) -> dict:
    lease_end = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0).isoformat()
    return {
        "model_server_model": model,
        "model_server_backend": backend,
        "model_server_api_key": secrets.token_urlsafe(32),
        "model_server_wheelhouse": str(engines.wheelhouse_dir()),
        "host_base_hf_endpoint": sim.host_url,
        "lease_expires_at": lease_end,
        **more,
    }


def converge(target, extravars: dict, events: list | None = None):
    return run(target, playbook="site.yml", extravars=extravars, on_event=None if events is None else events.append)


def call(target, keypair, path: str, key: str | None = None, body: dict | None = None) -> tuple[int, str]:
    """curl on the host: (status, body)."""
    cmd = ["curl", "-s", "--max-time", "120", "-w", "\\n%{http_code}"]
    if key:
        cmd += ["-H", f"Authorization: Bearer {key}"]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    out = on(target, keypair, " ".join(shlex.quote(c) for c in cmd + [f"http://127.0.0.1:8000{path}"]))
    text, _, status = out.rstrip("\n").rpartition("\n")
    return int(status), text


def check_private_server(target, keypair, key: str, model: str, engine_process: str, events: list) -> None:
    """What every backend must hold: 127.0.0.1:8000 and no other address, no answer without the
    key, the secrets in 0600 files of the service user and in no process's arguments or event."""
    listening = on(target, keypair, "sudo ss -Htlnp 'sport = :8000'")
    assert listening.split()[3] == "127.0.0.1:8000" and listening.count("\n") == 1, listening
    assert call(target, keypair, "/v1/models")[0] == 401
    assert call(target, keypair, "/v1/models", key="x" * 43)[0] == 401
    status, body = call(target, keypair, "/v1/models", key)
    assert status == 200 and model in [m["id"] for m in json.loads(body)["data"]]
    modes = on(target, keypair, "sudo stat -c '%a %U' /opt/gpu-session/env /opt/gpu-session/model-server.env").splitlines()
    assert modes == ["600 gpu-session"] * 2
    args = on(target, keypair, "ps -eo args")
    assert engine_process in args and key not in args
    assert not any(key in str(e) for e in events)
    pid = "$(sudo cat /run/gpu-session/gpu-session-model-server.pid)"
    assert on(target, keypair, f"ps -o user= -p {pid}").strip() == "gpu-session"
