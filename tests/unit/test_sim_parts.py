"""Pure parts of the simulator: cloud-init parsing, the stand-in nvidia-smi, the safetensors writer, faults."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from gpu_session.sim.hosts import nvidia_smi_script
from gpu_session.sim.models import write_safetensors
from gpu_session.sim.world import Fault, RateLimiter, _cloud_init_files


def test_cloud_init_write_files_plain_and_base64():
    doc = (
        "#cloud-config\nwrite_files:\n"
        "  - path: /etc/ssh/ssh_host_ed25519_key\n    permissions: '0600'\n"
        f"    encoding: b64\n    content: {base64.b64encode(b'secret').decode()}\n"
        "  - path: /opt/x\n    content: hello\n"
    )
    assert _cloud_init_files(doc) == [
        {"path": "/etc/ssh/ssh_host_ed25519_key", "content": "secret", "permissions": "0600"},
        {"path": "/opt/x", "content": "hello", "permissions": "0644"},
    ]
    assert _cloud_init_files("#!/bin/sh\necho not cloud-config") == []
    assert _cloud_init_files(None) == []


def run_smi(tmp_path, *args):
    script = tmp_path / "nvidia-smi"
    script.write_text(nvidia_smi_script([("NVIDIA A10 24GB", 23028)] * 2, ("580.95.05", "13.0")))
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)


def test_nvidia_smi_queries(tmp_path):
    out = run_smi(tmp_path, "--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader,nounits").stdout
    assert out.splitlines() == ["0, NVIDIA A10 24GB, 23028, 580.95.05", "1, NVIDIA A10 24GB, 23028, 580.95.05"]
    out = run_smi(tmp_path, "--query-gpu=memory.total", "--format=csv").stdout
    assert out.splitlines() == ["memory.total", "23028 MiB", "23028 MiB"]
    table = run_smi(tmp_path).stdout
    assert "SIMULATED" in table and "Driver Version: 580.95.05" in table and "CUDA Version: 13.0" in table
    bad = run_smi(tmp_path, "--query-gpu=bogus", "--format=csv")
    assert bad.returncode != 0 and "not a valid field" in bad.stderr


def test_safetensors_writer_rounds_to_bf16(tmp_path):
    values = np.array([[1.0, -2.5], [3.140625, 1e-3]], dtype=np.float32)
    write_safetensors(tmp_path / "m.safetensors", {"w": values})
    raw = (tmp_path / "m.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert (8 + n) % 8 == 0 and header["w"] == {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}
    back = (np.frombuffer(raw[8 + n :], dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(2, 2)
    np.testing.assert_allclose(back, values, rtol=1e-2)


def test_fault_matching():
    f = Fault("lambda:*", "503")
    assert f.matches("lambda", "instances") and not f.matches("runpod", "pod")
    assert Fault("runpod:pod", "500").matches("runpod", "pod") and not Fault("runpod:pod", "500").matches("runpod", "myself")


def test_rate_limiter_bucket(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("time.monotonic", lambda: now[0])
    limiter = RateLimiter()
    assert [limiter.allow(("k",), 1.0, 2) for _ in range(3)] == [True, True, False]
    now[0] += 1.0
    assert limiter.allow(("k",), 1.0, 2) and not limiter.allow(("k",), 1.0, 2)
    assert limiter.allow(("k",), 0, 0)  # rate 0: unlimited


@pytest.mark.parametrize("spec", ["lambda:x", "lambda:x:boom", "a:b:503:x:y"])
def test_bad_fault_specs(spec):
    from gpu_session.sim.__main__ import parse_fault

    with pytest.raises(SystemExit):
        parse_fault(spec)


@pytest.mark.parametrize(
    "path, ok",
    [
        ("/lambda/nfs/cache", True),
        ("/workspace", True),
        ("/runpod-volume", True),
        ("/home/ubuntu/cache", True),
        ("/workspace/../etc", False),
        ("/tmp/cache", False),  # covered by the host's tmpfs
        ("/srv/cache", False),  # the controller's own root: not private to a host
        ("workspace", False),
        ("/", False),
    ],
)
def test_where_volumes_may_be_mounted(path, ok):
    from gpu_session.sim.hosts import Hosts

    assert (Hosts.mount_refusal(path, isolated=True) is None) == ok
    assert "isolated hosts" in Hosts.mount_refusal(path, isolated=False)
