"""The `runpod` SDK is imported only by a process that calls RunPod: importing it costs about
1.2 s (its serverless debugger probes the CPU in a subprocess at import) and sets up the root
logger. So a Lambda session, and the Pulumi program of a RunPod one (which never calls the API),
never import it."""

from __future__ import annotations

import subprocess
import sys

CHECK = r"""
import logging, sys
from gpu_session.clouds import cloud_class, get_cloud
cls = cloud_class("runpod")
cloud = get_cloud("runpod", api_key="k" * 32)
assert "runpod" not in sys.modules, "the SDK was imported with our client"
before = (list(logging.getLogger().handlers), logging.getLogger().level)
from gpu_session.clouds.runpod import _sdk
sdk = _sdk()
assert "runpod" in sys.modules and hasattr(sdk, "create_pod") and hasattr(sdk.api.graphql, "run_graphql_query")
assert (list(logging.getLogger().handlers), logging.getLogger().level) == before, "the SDK's basicConfig stayed"
print("ok")
"""


def test_the_sdk_is_imported_on_first_use_only():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
