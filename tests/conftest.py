"""Shared fixtures: one simulator per test session (hosts are real), SSH keys, clients pointed at it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# Nothing a test does may touch the user's own state or config.
_SANDBOX = Path(tempfile.mkdtemp(prefix="gpu-session-tests-"))
os.environ["XDG_STATE_HOME"] = str(_SANDBOX / "state")
os.environ["XDG_CONFIG_HOME"] = str(_SANDBOX / "config")
# The engine's own files (logs, workspace settings) too; the CLI itself stays where it was installed.
os.environ["PULUMI_HOME"] = str(_SANDBOX / "pulumi-home")
for var in (
    "LAMBDA_API_KEY",
    "RUNPOD_API_KEY",
    "HF_TOKEN",
    "LAMBDA_API_BASE",
    "RUNPOD_API_BASE_URL",
    "RUNPOD_REST_API_BASE_URL",
    "HF_ENDPOINT",
    "PULUMI_BACKEND_URL",
    "PULUMI_CONFIG_PASSPHRASE",
    "PULUMI_CONFIG_PASSPHRASE_FILE",
    "PULUMI_ACCESS_TOKEN",
    "GPU_SESSION_COMMAND",  # messages name `invoke X` here unless a test sets it (errors.our_command)
    "GPU_SESSION_SIM",  # nor with --sim, unless a test rehearses with it
):
    os.environ.pop(var, None)

from gpu_session.clouds import LaunchSpec, RetryPolicy  # noqa: E402
from gpu_session.clouds.lambda_cloud import LambdaCloud  # noqa: E402
from gpu_session.clouds.runpod import RunpodCloud  # noqa: E402
from gpu_session.host.ansible import Target  # noqa: E402
from gpu_session.sim import SimConfig, Simulator  # noqa: E402

FAST_RETRY = RetryPolicy(attempts=5, base=0.05, cap=0.4)


# The slowest modules (CI's --durations, minutes on a 2-core machine), run first: two pytest-xdist
# workers take modules whole, each the next in line when it is free, so a long one started last
# would leave one worker running it alone.
SLOWEST_FIRST = [
    "tests/e2e/test_session.py",
    "tests/e2e/test_cache.py",
    "tests/roles/test_molecule.py",
    "tests/roles/test_model_server.py",
    "tests/pulumi/test_program.py",
    "tests/pulumi/test_cache_stack.py",
    "tests/roles/test_model_server_cache.py",
]


def pytest_collection_modifyitems(config, items):
    """The modules of SLOWEST_FIRST first, in its order; the rest as collected. Under pytest-xdist's
    `--dist loadfile --no-loadscope-reorder` (as `invoke test` runs it) each module's tests run on
    one worker, in order, so a module-scoped fixture (a model server, a site's converge) starts once."""
    rank = {m: n for n, m in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


@pytest.fixture(scope="session")
def sim(tmp_path_factory, wheelhouse):
    """One simulator for the session. After the engines' wheelhouse and prebuilt venvs (built here when
    missing): the simulator tells its hosts where they are only if they exist when it starts."""
    config = SimConfig(boot_delay=0.3, terminate_delay=0.1, gone_after=0.5, lambda_rate=0, lambda_launch_rate=0)
    with Simulator(tmp_path_factory.mktemp("sim"), config) as s:
        yield s


@pytest.fixture
def sim_env(sim, monkeypatch):
    """Point every client at the simulator through the environment, as `eval "$(invoke sim)"` does."""
    for k, v in sim.env().items():
        monkeypatch.setenv(k, v)
    return sim.env()


@pytest.fixture(autouse=True)
def _no_leftover_faults(request):
    yield
    if "sim" in request.fixturenames:
        s = request.getfixturevalue("sim")
        pending = list(s.world.faults)
        s.world.faults.clear()
        assert not pending, f"test left injected faults unused: {pending}"


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """The engines' wheels, which simulator hosts (no internet) install from, and the venvs prebuilt
    from them, which hosts link to: built once per machine (`invoke engines`)."""
    from gpu_session.host import engines

    return engines.build(progress=lambda _: None)[0]


@pytest.fixture(scope="session")
def prebuilt_venvs(wheelhouse) -> Path:
    from gpu_session.host import engines

    return engines.venvs_dir()


@dataclass
class KeyPair:
    private: Path
    public: str


@pytest.fixture(scope="session")
def keypair(tmp_path_factory) -> KeyPair:
    d = tmp_path_factory.mktemp("keys")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tests", "-f", str(d / "id")], check=True)
    return KeyPair(d / "id", (d / "id.pub").read_text().strip())


@pytest.fixture
def name(request) -> str:
    """A deterministic instance name unique to the test. A test that fails half-way may leave
    instances behind; they are terminated afterwards so they cannot disturb the next test."""
    prefix = "t-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]
    yield prefix
    if "sim" in request.fixturenames:
        world = request.getfixturevalue("sim").world
        for inst in list(world.instances.values()):
            if inst.name.startswith(prefix) and inst.status not in ("terminating", "terminated"):
                world.terminate(inst)


def ssh(endpoint, key: KeyPair, command: str, known_hosts: Path | None = None, strict: bool = False, timeout: int = 30):
    """Run a command over real ssh; known_hosts pins the host key when strict."""
    opts = [
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10",
        "-o", f"StrictHostKeyChecking={'yes' if strict else 'accept-new'}",
        "-o", f"UserKnownHostsFile={known_hosts or '/dev/null'}", "-o", "LogLevel=ERROR",
    ]  # fmt: skip
    return subprocess.run(
        ["ssh", "-i", str(key.private), "-p", str(endpoint.port), *opts, f"{endpoint.user}@{endpoint.host}", command],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def on(target, keypair: KeyPair, command: str) -> str:
    """Run a command on a configuration target over pinned ssh; it must succeed."""
    from gpu_session.clouds import SshEndpoint

    out = ssh(SshEndpoint(target.host, target.port, target.user), keypair, command, known_hosts=target.known_hosts, strict=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def own_instances(sim, name: str) -> list[dict]:
    return [i for i in sim.instances() if i["name"] == name]


def pin(endpoint, known_hosts):
    """Trust the host key the host presents now (what the session does on first contact)."""
    scan = subprocess.run(
        ["ssh-keyscan", "-p", str(endpoint.port), "-t", "ed25519", endpoint.host], capture_output=True, text=True
    )
    known_hosts.write_text(scan.stdout)


@pytest.fixture(scope="module")
def hosts(sim, keypair, tmp_path_factory, request):
    """Configuration targets: a 1x A10 Lambda host (ubuntu + sudo) and a 2x RTX 4090 RunPod host (root),
    launched once per test module, their host keys pinned."""
    prefix = "role-" + request.module.__name__.split(".")[-1].removeprefix("test_").replace("_", "-")
    env = sim.env()
    lam = LambdaCloud(
        api_key=env["LAMBDA_API_KEY"], base_url=env["LAMBDA_API_BASE"], retry=FAST_RETRY, launch_interval=0, poll_interval=0.05
    )
    rp = RunpodCloud(api_key=env["RUNPOD_API_KEY"], base_url=env["RUNPOD_API_BASE_URL"], retry=FAST_RETRY, poll_interval=0.05)
    key = lam.register_ssh_key(f"{prefix}-key", keypair.public)
    a = lam.launch(LaunchSpec(name=f"{prefix}-a10", instance_type="gpu_1x_a10", ssh_key_name=key.name))
    b = rp.launch(
        LaunchSpec(name=f"{prefix}-4090", instance_type="NVIDIA GeForce RTX 4090", gpu_count=2, ssh_public_key=keypair.public)
    )
    targets = {}
    for cloud, iid, label in ((lam, a, "lambda"), (rp, b, "runpod")):
        endpoint = cloud.wait_ready(iid, time.monotonic() + 30)
        known = tmp_path_factory.mktemp(label) / "known_hosts"
        pin(endpoint, known)
        targets[label] = Target(endpoint.host, endpoint.port, endpoint.user, keypair.private, known)
    yield targets
    lam.terminate_and_wait(a, time.monotonic() + 30)
    rp.terminate_and_wait(b, time.monotonic() + 30)
    lam.delete_ssh_key(key.id)
