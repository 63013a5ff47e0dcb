"""The provider process as the Pulumi engine runs it: `python -m pulumi.dynamic`, started from a
folder where our package is importable only through PYTHONPATH (as the stack wrapper sets it),
driven over gRPC through configure, check, create, read and delete against the simulator."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from conftest import own_instances
from pulumi.dynamic.dynamic import serialize_provider
from pulumi.runtime import proto, rpc
from pulumi.runtime.proto import provider_pb2_grpc

from gpu_session.providers import GpuInstanceProvider
from gpu_session.providers.instance import OUTPUTS

ROOT = Path(__file__).resolve().parents[2]  # the checkout

URN = "urn:pulumi:dev::gpu-session::pulumi-python:dynamic/gpu_session:GpuInstance::gpu"


def struct(props: dict):
    return asyncio.run(rpc.serialize_properties(props, {}))


@pytest.fixture
def provider(sim, tmp_path):
    """The provider process, started as the engine starts it (working directory: the program's
    main folder, infra/), and a stub to call it. Its credentials come from the stack config
    (Configure); the environment it gets has the simulator's addresses but no API key."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update({k: v for k, v in sim.env().items() if not k.endswith("_API_KEY")})
    env.update(PYTHONPATH=str(ROOT), PULUMI_PROJECT="gpu-session")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pulumi.dynamic"],
        cwd=ROOT / "infra",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(proc.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = provider_pb2_grpc.ResourceProviderStub(channel)
            stub.Configure(proto.ConfigureRequest(args=struct({"gpu-session:runpodApiKey": sim.runpod_key}), acceptSecrets=False))
            yield stub
    finally:
        proc.terminate()
        proc.wait(10)


def test_check_create_read_delete_over_grpc(provider, sim, keypair, name):
    blob = serialize_provider(GpuInstanceProvider())
    pickled = base64.b64decode(blob)
    assert b"gpu_session.providers.instance" in pickled and sim.runpod_key.encode() not in pickled  # a reference, never a key
    news = {"__provider": blob, "cloud": "runpod", "name": name, "gpu_type": "NVIDIA GeForce RTX 4090", "gpu_count": 1,
            "ssh_public_key": keypair.public, "ready_timeout_s": 60, **dict.fromkeys(OUTPUTS)}  # fmt: skip

    bad = provider.Check(proto.CheckRequest(urn=URN, olds=struct({}), news=struct({**news, "cloud": "aws"})))
    assert [(f.property, "lambda, runpod" in f.reason) for f in bad.failures] == [("cloud", True)]
    checked = provider.Check(proto.CheckRequest(urn=URN, olds=struct({}), news=struct(news)))
    assert not checked.failures

    created = provider.Create(proto.CreateRequest(urn=URN, properties=checked.inputs))
    outs = rpc.deserialize_properties(created.properties)
    assert created.id and outs["user"] == "root" and outs["host"] and outs["__provider"] == blob
    assert [i["id"] for i in own_instances(sim, name)] == [created.id]

    read = provider.Read(proto.ReadRequest(id=created.id, urn=URN, properties=created.properties))
    assert read.id == created.id

    provider.Delete(proto.DeleteRequest(id=created.id, urn=URN, properties=created.properties))
    gone = provider.Read(proto.ReadRequest(id=created.id, urn=URN, properties=created.properties))
    assert gone.id == ""
