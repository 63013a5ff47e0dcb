"""`invoke bench`: one whole session against the simulator, timed (not a test: these machines are
noisy, so the report leans on ratios measured in the same run).

- up → ready, split into provision (key, instance, boot, SSH), configure (the playbook) and the
  model server's own start inside it; the share of up spent outside the server's start;
- the tunnel's first-token overhead: time to first token through client and tunnel, minus the same
  request made on the host (median of several);
- a no-change configure; down (scrub, destroy, verify).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

from . import session
from .chat.client import ChatClient
from .paths import stack_dir
from .ssh import Endpoint, session_keys, ssh_command

STACK = "bench"
MODEL = "gpu-session/tiny-chat"
ROUNDS = 7
PROMPT = [{"role": "user", "content": "Say hello"}]

# Runs on the host: the same streamed request, to 127.0.0.1:8000 directly. The key is read from the
# server's env file there (never an argument); prints the median time to first byte of content.
ON_HOST = r"""
import json, statistics, sys, time, urllib.request
env = dict(l.strip().split("=", 1) for l in open("/opt/gpu-session/model-server.env") if "=" in l and not l.startswith("#"))
key = env["GPU_SESSION_API_KEY"].strip('"').strip("'")
body = json.dumps({"model": sys.argv[1], "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "Say hello"}]}).encode()
times = []
for _ in range(int(sys.argv[2])):
    req = urllib.request.Request("http://127.0.0.1:8000/v1/chat/completions", data=body,
                                 headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    start = time.monotonic()
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r:
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                times.append(time.monotonic() - start)
                break
print(statistics.median(times))
"""


def _host_first_token(endpoint: Endpoint, model: str) -> float:
    keys = session_keys(STACK)
    remote = f"sudo -n python3 - {model} {ROUNDS}" if endpoint.user != "root" else f"python3 - {model} {ROUNDS}"
    out = subprocess.run(ssh_command(keys, endpoint) + [remote], input=ON_HOST, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise session.SessionError(f"the on-host measurement failed: {out.stderr.strip()[-500:]}")
    return float(out.stdout.strip())


def run(backend: str = "transformers", cloud: str = "lambda", say=print) -> dict:
    session.use_simulator(say)
    events = []
    start = time.monotonic()
    outputs = session.up(
        session.UpOptions(MODEL, cloud=cloud, backend=backend, hours=1, stack=STACK),
        confirm=lambda plan: True, say=say, on_event=events.append,
    )  # fmt: skip
    up_s = time.monotonic() - start
    took = {e.type: e.seconds for e in events if e.kind == "done" and e.op == "create"}
    configured = json.loads((stack_dir(STACK) / "configured.json").read_text())
    try:
        client = ChatClient.for_stack(STACK)
        tunnel_s = statistics.median(
            client.stream(PROMPT, on_token=lambda _: None, max_tokens=4).first_token_s for _ in range(ROUNDS)
        )
        host_s = _host_first_token(Endpoint.of(outputs), outputs["served_model_name"])
        start = time.monotonic()
        session.reconfigure(STACK, say=lambda _: None)
        no_change_s = time.monotonic() - start
    finally:
        start = time.monotonic()
        session.down(STACK, say=say, on_event=lambda _: None)
        down_s = time.monotonic() - start
    server_s = configured["phases"]["server_start"]
    return {
        "backend": backend,
        "cloud": cloud,
        "model": MODEL,
        "up_to_ready_s": round(up_s, 1),
        "provision_s": round(took.get("GpuInstance", 0) + took.get("LambdaSshKey", 0), 1),
        "configure_s": round(took.get("Command", 0), 1),
        "server_start_s": server_s,
        "outside_server_start_share": round((up_s - server_s) / up_s, 2),
        "first_token_through_tunnel_ms": round(tunnel_s * 1000, 1),
        "first_token_on_host_ms": round(host_s * 1000, 1),
        "tunnel_overhead_ms": round((tunnel_s - host_s) * 1000, 1),
        "no_change_configure_s": round(no_change_s, 1),
        "down_s": round(down_s, 1),
    }


def table(report: dict) -> str:
    rows = [(k.replace("_", " "), v) for k, v in report.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def save(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")
