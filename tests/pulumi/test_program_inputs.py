"""What the program (infra/__main__.py) gives its resources for a stack's config, under Pulumi's
own unit-test mocks (pulumi.runtime.set_mocks: the program runs, no engine registers anything, no
cloud is asked): the inputs no engine test looks at one by one, chiefly whether the weights may go
on the cache volume (Configure's cache_weights). The model's metadata comes from the simulator's Hub,
as the program reads it in a session."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gpu_session.paths import ASSETS

# Runs in its own process (the program is module-level code, and the mocks are the process's):
# argv[1] is the stack's config as JSON; prints each resource's type and inputs as JSON.
UNDER_MOCKS = r"""
import json, runpy, sys
import pulumi

resources = []

class Mocks(pulumi.runtime.Mocks):
    def new_resource(self, args):
        inputs = {k: v for k, v in args.inputs.items() if k != "__provider"}  # the pickled provider
        resources.append({"name": args.name, "inputs": inputs})
        # What GpuInstance's create returns (gpu_session.providers.instance), for a volume at /lambda/cache.
        outputs = {"instance_id": "i-0", "host": "10.0.0.2", "port": 22, "user": "ubuntu", "gpu_name": "A10",
                   "gpu_count": 1, "price_per_hour": 0.75, "launched_at": "2026-12-02T10:00:00+00:00",
                   "cache_path": "/lambda/cache" if inputs.get("volume_id") else "", "cache_size_gb": 0}
        return [args.name + "-id", {**inputs, **outputs}]

    def call(self, args):
        return {}

pulumi.runtime.set_mocks(Mocks(), project="gpu-session", stack="mocked", preview=False)
pulumi.runtime.set_all_config({f"gpu-session:{k}": v for k, v in json.loads(sys.argv[1]).items()})

@pulumi.runtime.test
def program():
    runpy.run_path(sys.argv[2], run_name="__main__")

program()
print(json.dumps(resources))
"""


def program_inputs(env: dict, tmp_path, **config: str) -> dict[str, dict]:
    """Each resource's inputs (by its name in the program) for `config` (keys without the namespace)."""
    done = subprocess.run(
        [sys.executable, "-c", UNDER_MOCKS, json.dumps(config), str(ASSETS / "infra" / "__main__.py")],
        env={**os.environ, **env, "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["name"]: r["inputs"] for r in json.loads(done.stdout.splitlines()[-1])}


PUBLIC, GATED = "gpu-session/tiny-chat", "meta-llama/Llama-3.1-8B-Instruct"


@pytest.mark.parametrize(
    ("model", "config", "weights_on_volume"),
    [
        (PUBLIC, {}, "true"),
        (PUBLIC, {"cacheWeights": "false"}, "false"),  # `up` says so where the volume holds the engine alone
        (GATED, {}, "false"),  # a gated model's weights stay off a volume that outlives the token…
        (GATED, {"cacheGated": "true"}, "true"),  # …unless the user said so
        (GATED, {"cacheGated": "true", "cacheWeights": "false"}, "false"),
    ],
    ids=["public", "public-engine-only", "gated", "gated-opted-in", "gated-opted-in-engine-only"],
)
def test_configure_is_told_whether_the_weights_may_go_on_the_cache_volume(sim_env, tmp_path, model, config, weights_on_volume):
    inputs = program_inputs(sim_env, tmp_path, model=model, cloud="lambda", cacheVolume="vol-1", device="cpu", **config)
    assert inputs["gpu"]["volume_id"] == "vol-1"
    configure = inputs["configure"]
    assert (configure["cache_weights"], configure["cache_root"]) == (weights_on_volume, "/lambda/cache")


def test_without_a_cache_volume_configure_has_no_cache_root(sim_env, tmp_path):
    inputs = program_inputs(sim_env, tmp_path, model=PUBLIC, cloud="lambda", device="cpu")
    assert inputs["gpu"].get("volume_id") is None
    assert inputs["configure"]["cache_root"] == ""
