"""Molecule's hosts: launch or terminate a cloud-simulator instance for a scenario, with our own
cloud clients (the simulator's exports in the environment point them at it).

create prints molecule's instance config for the host (address, port, user, key) and pins the
host's key in the scenario's known_hosts; destroy terminates by name and prints what it ended.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gpu_session.clouds import LaunchSpec, get_cloud

# Lambda's types fix the GPU count in the name; RunPod takes a count.
TYPES = {"lambda": "gpu_1x_a10", "runpod": "NVIDIA GeForce RTX 4090"}


def create(cloud, args) -> dict:
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    key = d / f"{args.instance}_key"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "molecule", "-f", str(key)], check=True)
    public = key.with_suffix(".pub").read_text().strip()
    spec = LaunchSpec(name=args.name, instance_type=TYPES[args.cloud], gpu_count=1 if args.cloud == "lambda" else args.gpus)
    if args.cloud == "lambda":
        spec.ssh_key_name = cloud.register_ssh_key(args.name, public).name
    else:
        spec.ssh_public_key = public
    endpoint = cloud.wait_ready(cloud.launch(spec), time.monotonic() + 120)
    scan = subprocess.run(
        ["ssh-keyscan", "-p", str(endpoint.port), "-t", "ed25519", endpoint.host], capture_output=True, text=True
    )
    with open(d / "known_hosts", "a") as known:
        known.write(scan.stdout)
    return {"instance": args.instance, "address": endpoint.host, "port": endpoint.port, "user": endpoint.user,
            "identity_file": str(key), "become_method": "sudo" if endpoint.user != "root" else False}  # fmt: skip


def destroy(cloud, args) -> list[str]:
    ended = []
    for inst in cloud.list(args.name):
        if inst.name == args.name:
            cloud.terminate_and_wait(inst.id, time.monotonic() + 120)
            ended.append(inst.id)
    if args.cloud == "lambda":
        for key in cloud.list_ssh_keys():
            if key.name == args.name:
                cloud.delete_ssh_key(key.id)
    return ended


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("action", choices=["create", "destroy"])
    p.add_argument("--cloud", choices=sorted(TYPES), default="runpod")
    p.add_argument("--name", required=True)
    p.add_argument("--gpus", type=int, default=1, help="RunPod: how many GPUs")
    p.add_argument("--instance", default="instance")
    p.add_argument("--dir", default=".")
    args = p.parse_args()
    if not (os.environ.get("LAMBDA_API_BASE") or os.environ.get("RUNPOD_API_BASE_URL")):
        sys.exit('No simulator in the environment: run `invoke sim` and eval "$(invoke sim --env)" first.')
    cloud = get_cloud(args.cloud)
    out = create(cloud, args) if args.action == "create" else destroy(cloud, args)
    print(json.dumps(out) if out else "")


if __name__ == "__main__":
    main()
