"""Parts of the simulator: cloud-init parsing, the stand-in nvidia-smi, the safetensors writer, faults, and
the world's volumes (their usage, their deletion) without hosts or a server."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gpu_session.sim import lambda_api, runpod_api
from gpu_session.sim.hosts import nvidia_smi_script
from gpu_session.sim.http import Request, Router
from gpu_session.sim.models import write_safetensors
from gpu_session.sim.world import TRASH_DIR, Fault, RateLimiter, SimConfig, World, _cloud_init_files


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


# --- volumes: what the world counts and how it deletes ------------------------------------------


@pytest.fixture
def world(tmp_path):
    """A world of loopback hosts (nothing to start, no network) with both clouds' APIs on a router."""
    w = World(tmp_path / "state", SimConfig(lambda_rate=0, lambda_launch_rate=0, isolate_hosts=False))
    router = Router()
    lambda_api.mount(router, w)
    runpod_api.mount(router, w)
    w.router = router
    yield w
    w.close()
    w.empty_trash()


def call(world, cloud: str, method: str, path: str):
    key = world.lambda_keys[0] if cloud == "lambda" else world.runpod_keys[0]
    prefix = lambda_api.PREFIX if cloud == "lambda" else "/v1"
    req = Request(method, prefix + path, {}, {"authorization": f"Bearer {key}"}, b"")
    return world.router.dispatch(req)


def test_bytes_used_counts_a_hard_linked_file_once(world):
    vol = world.new_volume("lambda", "cache", "us-east-1")
    folder = world.volume_dir(vol)
    (folder / "cache").mkdir()
    (folder / "cache" / "wheel.so").write_bytes(b"x" * 1000)
    (folder / "venv").mkdir()
    os.link(folder / "cache" / "wheel.so", folder / "venv" / "wheel.so")  # as uv links its cache into venvs
    os.link(folder / "cache" / "wheel.so", folder / "venv" / "again.so")
    (folder / "venv" / "own.py").write_bytes(b"y" * 10)
    (folder / "venv" / "link").symlink_to("own.py")  # a symlink counts its own size, not its target's
    assert world.volume_bytes(vol) == 1000 + 10 + len("own.py")
    [listed] = json.loads(call(world, "lambda", "GET", "/file-systems").body)["data"]
    assert listed["bytes_used"] == 1016


@pytest.mark.parametrize("cloud", ["lambda", "runpod"])
def test_delete_answers_before_the_volume_folder_is_removed(world, cloud, monkeypatch):
    """The folder leaves volumes/ with the answer and is removed after it, off the request: removal is
    held here until the answer has come, which a delete that removed in the request would never give."""
    vol = world.new_volume(cloud, "cache", *(("us-east-1", None) if cloud == "lambda" else ("EU-RO-1", 10)))
    folder = world.volume_dir(vol)
    (folder / "sub").mkdir()
    (folder / "sub" / "weights").write_bytes(b"w" * 100)
    answered, real_rmtree = threading.Event(), shutil.rmtree

    def rmtree_after_the_answer(path, *args, **kwargs):
        if Path(path).is_relative_to(world.state_dir):
            answered.wait(30)  # a hang guard
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree_after_the_answer)
    path = f"/filesystems/{vol.id}" if cloud == "lambda" else f"/networkvolumes/{vol.id}"
    got = []
    deleting = threading.Thread(target=lambda: got.append(call(world, cloud, "DELETE", path)), daemon=True)
    deleting.start()
    deleting.join(30)
    assert got, "the delete did not answer before its folder's removal"
    answered.set()
    assert got[0].status == (200 if cloud == "lambda" else 204)
    assert not folder.exists() and os.listdir(world.volumes_root) == []
    listing = call(world, cloud, "GET", "/file-systems" if cloud == "lambda" else "/networkvolumes")
    assert vol.id not in listing.body.decode()
    again = call(world, cloud, "DELETE", path)
    assert again.status == 404
    if cloud == "lambda":
        assert json.loads(again.body)["error"]["code"] == "global/object-does-not-exist"
    deadline = time.monotonic() + 30  # a hang guard, not a speed test
    while any(world.trash_root.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(world.trash_root.iterdir()) == []
    assert json.loads((world.state_dir / "volumes.json").read_text()) == []


def test_trash_outlives_neither_the_simulator_nor_a_restart(world, tmp_path, monkeypatch, capsys):
    from gpu_session.sim import __main__ as sim_main
    from gpu_session.sim import hosts

    kept = world.new_volume("lambda", "kept", "us-east-1")
    (world.volume_dir(kept) / "f").write_text("stays")
    state = world.state_dir
    gone = world.new_volume("lambda", "gone", "us-east-1")
    shutil.rmtree(world.trash_root)  # removed by hand: a delete still takes the folder out of volumes/
    world.delete_volume(gone)
    world.empty_trash()
    assert not world.volume_dir(gone).exists() and list(world.volumes_root.iterdir()) == [world.volume_dir(kept)]
    leftover = state / TRASH_DIR / "deadbeef-0000"  # what a simulator killed while removing left
    (leftover / "d").mkdir(parents=True)
    (leftover / "d" / "f").write_text("x")
    world.empty_trash()  # Simulator.close
    assert list((state / TRASH_DIR).iterdir()) == []

    (leftover / "d").mkdir(parents=True)
    monkeypatch.setattr(hosts, "reclaim_networks", lambda: (0, 0))  # other simulators' networks are not this test's
    assert sim_main.main(["--state-dir", str(state), "--cleanup"]) == 0
    assert list((state / TRASH_DIR).iterdir()) == []
    assert capsys.readouterr().err.startswith("removed 1 deleted volume(s)' leftovers")
    assert sim_main.main(["--state-dir", str(state), "--cleanup"]) == 0  # nothing left: not said to be removed
    assert capsys.readouterr().err.startswith("nothing to clean up")

    (leftover / "d").mkdir(parents=True)
    restarted = World(state, SimConfig(isolate_hosts=False))  # a restart removes the trash, keeps the volumes
    try:
        assert restarted._removals, "a restart with trash left did not start its removal"
        for removal in list(restarted._removals):  # its own removal, not empty_trash's (which would remove it anyway)
            removal.join(30)  # a hang guard
        assert list((state / TRASH_DIR).iterdir()) == []
        assert list(restarted.volumes) == [kept.id] and (restarted.volume_dir(kept) / "f").read_text() == "stays"
    finally:
        restarted.close()


def test_a_client_that_hung_up_is_one_log_line(caplog, capsys):
    """A client that gives up (its timeout) before the answer: the server logs a line, no traceback."""
    import logging
    import socket

    from gpu_session.sim.http import Server, json_response

    asked, hung_up = threading.Event(), threading.Event()

    def slow(req):
        asked.set()
        hung_up.wait(30)  # a hang guard
        return json_response({"data": "x" * 10_000_000})  # more than the socket's buffers take

    router = Router()
    router.add("DELETE", "/slow", slow)
    server = Server(router, ["127.0.0.1"])
    server.start()
    caplog.set_level(logging.INFO, logger="gpu_session.sim.http")
    try:
        client = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        client.sendall(b"DELETE /slow HTTP/1.1\r\nHost: sim\r\nContent-Length: 0\r\n\r\n")
        assert asked.wait(30)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        client.close()
        hung_up.set()
        deadline = time.monotonic() + 30  # a hang guard
        while "hung up" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.close()
    [line] = [r.getMessage() for r in caplog.records if "hung up" in r.getMessage()]
    assert re.fullmatch(r"client 127\.0\.0\.1 hung up before the answer to DELETE /slow was sent \(\w+Error\)", line), line
    assert "Traceback" not in capsys.readouterr().err
