"""Benchmark: how long site.yml takes to turn a fresh simulator host into a ready model server.

Measured in one run, on one host (these machines are noisy; compare the ratios):
  - the first converge with warm package caches (the wheelhouse), split into install, download and
    server start, and how much of the download the engine's install hid;
  - a second, no-change converge (target: under 5 s);
  - the share of the first converge spent outside the server's own start-up.

    python tests/bench/converge.py [--backend vllm|transformers] [--json out.json]

Needs root (simulator hosts) and the wheelhouse (`invoke engines`).
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpu_session.clouds import LaunchSpec  # noqa: E402
from gpu_session.clouds.runpod import RunpodCloud  # noqa: E402
from gpu_session.host import engines  # noqa: E402
from gpu_session.host.ansible import Target, run  # noqa: E402
from gpu_session.host.converge import PHASES  # noqa: E402
from gpu_session.sim import SimConfig, Simulator  # noqa: E402

MODELS = {"vllm": "gpu-session/tiny-chat", "transformers": "gpu-session/tiny-vision"}


def converge(target: Target, extravars: dict) -> tuple[float, dict[str, float], dict]:
    per_task: dict[str, float] = defaultdict(float)
    start = time.monotonic()
    result = run(
        target,
        playbook="site.yml",
        extravars=extravars,
        on_event=lambda e: per_task.__setitem__(e.task, per_task[e.task] + e.seconds),
    )
    return time.monotonic() - start, per_task, result.facts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=sorted(MODELS), default="vllm")
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("--hub-delay", type=float, default=4.0, help="seconds each Hub file request waits (a slow link)")
    args = p.parse_args()
    wheelhouse = engines.build_wheelhouse()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    with Simulator(work / "sim", SimConfig(boot_delay=0.3, lambda_rate=0, lambda_launch_rate=0)) as sim:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "id")], check=True)
        cloud = RunpodCloud(api_key=sim.runpod_key, base_url=sim.env()["RUNPOD_API_BASE_URL"])
        pod = cloud.launch(
            LaunchSpec(name="bench", instance_type="NVIDIA GeForce RTX 4090", ssh_public_key=(work / "id.pub").read_text())
        )
        endpoint = cloud.wait_ready(pod, time.monotonic() + 60)
        scan = subprocess.run(["ssh-keyscan", "-p", str(endpoint.port), endpoint.host], capture_output=True, text=True)
        (work / "known_hosts").write_text(scan.stdout)
        target = Target(endpoint.host, endpoint.port, endpoint.user, work / "id", work / "known_hosts")
        extravars = {
            "model_server_model": MODELS[args.backend],
            "model_server_backend": args.backend,
            "model_server_device": "cpu",  # the simulator's hosts have no GPU
            "model_server_api_key": secrets.token_urlsafe(32),
            "model_server_wheelhouse": str(wheelhouse),
            "host_base_hf_endpoint": sim.host_url,
            "lease_expires_at": "2099-01-01T00:00:00+00:00",
        }
        # A slow link to the Hub (each file request waits), so the download is long enough to see
        # how much of it the engine's install hides. The small model alone downloads in 0.1 s.
        sim.inject("hf:resolve", "slow", times=40, delay=args.hub_delay)
        first, tasks, facts = converge(target, extravars)
        sim.world.faults.clear()
        again, again_tasks, _ = converge(target, extravars)
        cloud.terminate_and_wait(pod, time.monotonic() + 60)
    phase = {name: round(sum(tasks.get(t, 0) for t in names), 1) for name, names in PHASES.items()}
    download = float(facts.get("model_server_timings", {}).get("download_s", 0))
    report = {
        "backend": args.backend,
        "model": MODELS[args.backend],
        "first_converge_s": round(first, 1),
        "install_s": phase["install"],
        "download_s": download,
        "download_wait_after_install_s": phase["download_wait"],
        "download_hidden_by_install": round(min(1.0, max(0.0, 1 - phase["download_wait"] / download)), 2) if download else None,
        "server_start_s": phase["server_start"],
        "outside_server_start_share": round(1 - phase["server_start"] / first, 2),
        "no_change_converge_s": round(again, 1),
        "no_change_vs_first": round(again / first, 3),
        "no_change_slowest_tasks": {t: round(d, 2) for t, d in sorted(again_tasks.items(), key=lambda kv: -kv[1])[:8]},
    }
    width = max(map(len, report))
    for k, v in report.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
