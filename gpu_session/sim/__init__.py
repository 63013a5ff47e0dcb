"""The cloud simulator: Lambda Cloud and RunPod APIs and a Hugging Face Hub subset on loopback,
whose instances are real hosts. Independent of gpu_session.clouds by design (DESIGN.md): a
misreading of the wire contract in a client cannot be mirrored here and pass unnoticed. It sits
beside the product's layers: only gpu_session.cli and the tests import it.

    with Simulator(state_dir) as sim:
        os.environ.update(sim.env())
        ...
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path

from gpu_session.host.engines import venvs_dir, wheelhouse_dir
from gpu_session.paths import state_dir

from . import hf_hub, hub_models, lambda_api, runpod_api
from .http import Request, Router, Server, json_response
from .world import Fault, SimConfig, World, new_keys

__all__ = ["Fault", "SimConfig", "Simulator", "default_state_dir"]

# An instance in these states holds no session's host any more: the simulator may stop.
ENDED_STATUSES = ("terminating", "terminated", "preempted")


def default_state_dir() -> Path:
    """Where `invoke sim` keeps its hosts and sim.json; GPU_SESSION_SIM_DIR points the --list,
    --fault and --env commands at another simulator's folder (the tests' own, for one)."""
    return Path(os.environ["GPU_SESSION_SIM_DIR"]) if os.environ.get("GPU_SESSION_SIM_DIR") else state_dir() / "sim"


class Simulator:
    def __init__(self, state_dir: Path | None = None, config: SimConfig | None = None, port: int = 0):
        self.state_dir = Path(state_dir or default_state_dir())
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.world = World(self.state_dir, config, keys=self._load_keys())
        self.admin_token = secrets.token_urlsafe(24)
        # Set by POST /_sim/stop (`invoke sim --stop`); only a simulator in a process of its own
        # (`python -m gpu_session.sim`) waits on it, so only that one is stoppable from outside.
        self.stop_requested = threading.Event()
        self.stoppable = False
        router = Router()
        lambda_api.mount(router, self.world)
        runpod_api.mount(router, self.world)
        self._mount_admin(router)
        self.hub = hf_hub.mount(router, self.world, self.state_dir / "models")  # last: its routes are broad
        addresses = ["127.0.0.1"] + ([self.world.hosts.gateway] if self.world.hosts.isolated else [])
        self.server = Server(router, addresses, port)
        self.world.host_api_base = self.host_url  # what pods use to reach the RunPod API
        self.server.start()
        self._write_info()

    # --- addresses and keys ----------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def host_url(self) -> str:
        """The simulator as its hosts reach it (also reachable from the controller)."""
        return f"http://{self.world.hosts.gateway}:{self.server.port}"

    @property
    def lambda_key(self) -> str:
        return self.world.lambda_keys[0]

    @property
    def runpod_key(self) -> str:
        return self.world.runpod_keys[0]

    @property
    def hf_token(self) -> str:
        return self.world.hf_tokens[0]

    def env(self) -> dict[str, str]:
        """What points every client at the simulator. HF_ENDPOINT uses the address hosts can reach."""
        return {
            "LAMBDA_API_BASE": f"{self.url}/api/v1",
            "RUNPOD_API_BASE_URL": self.url,
            "RUNPOD_REST_API_BASE_URL": f"{self.url}/v1",  # RunPod's REST API (network volumes)
            "HF_ENDPOINT": self.host_url,
            "LAMBDA_API_KEY": self.lambda_key,
            "RUNPOD_API_KEY": self.runpod_key,
            "HF_TOKEN": self.hf_token,
            # The hosts have no GPU (their nvidia-smi is a stand-in): the model server runs on the CPU.
            "GPU_SESSION_DEVICE": "cpu",
            # Hosts have no internet: the model server installs from this machine's wheelhouse
            # (`invoke engines`), which they see through their /var, or links the venv prebuilt there.
            **({"GPU_SESSION_HOST_WHEELHOUSE": str(wheelhouse)} if (wheelhouse := wheelhouse_dir()).is_dir() else {}),
            **({"GPU_SESSION_HOST_VENVS": str(venvs)} if (venvs := venvs_dir()).is_dir() else {}),
        }

    def _load_keys(self) -> dict[str, list[str]]:
        """The simulator's keys survive restarts (keys.json, 0600), so a configured client keeps working."""
        path = self.state_dir / "keys.json"
        if path.exists():
            return json.loads(path.read_text())
        keys = new_keys()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(keys, f)
        return keys

    # --- knobs (Python API; the same over HTTP under /_sim) ---------------------------------

    def accept_key(self, api: str, key: str) -> None:
        """Accept one more credential for api ("lambda", "runpod" or "hf") until the simulator stops."""
        self.world.keys[api].append(key)

    def deactivate_key(self, key: str) -> None:
        """Lambda: the key stays valid but its account is inactive (403 global/account-inactive)."""
        with self.world.lock:
            self.world.keys["lambda"].remove(key)
            self.world.inactive_keys.add(key)

    def inject(self, target: str, kind: str, times: int = 1, delay: float = 5.0) -> None:
        self.world.inject(Fault(target, kind, times, delay))

    def set_capacity(self, cloud: str, type_name: str, slots: int, region: str | None = None) -> None:
        """How many instances of the type a region (default: every region) can hold; live ones count."""
        self.world.set_capacity(cloud, type_name, region, slots)

    def add_hub_models(self, entries: list[hub_models.HubModel]) -> None:
        """More Hub entries (hub_models.parse or load); one with an id already served replaces it."""
        self.hub.add(entries)

    def kill_instance(self, instance_id: str) -> None:
        self.world.kill_instance(instance_id)

    def make_unhealthy(self, instance_id: str) -> None:
        self.world.make_unhealthy(instance_id)

    def instances(self, cloud: str | None = None) -> list[dict]:
        return [i for i in self.world.snapshot()["instances"] if cloud in (None, i["cloud"])]

    def ssh_keys(self) -> list[dict]:
        return self.world.snapshot()["ssh_keys"]

    def volumes(self, cloud: str | None = None) -> list[dict]:
        """Every volume: id, cloud, name, region, size_gb, dir (its folder here), used_by (instance ids)."""
        return [v for v in self.world.snapshot()["volumes"] if cloud in (None, v["cloud"])]

    def volume_dir(self, volume_id: str) -> Path:
        """The folder that holds a volume's files (what hosts that attach it see at its mount point)."""
        return self.world.volumes_root / volume_id

    def host_pids(self, instance_id: str) -> list[int]:
        return self.world.hosts.pids(instance_id)

    def host_dir(self, instance_id: str) -> Path:
        return self.world.hosts.dir / instance_id

    def wait_gone(self, instance_id: str, timeout: float = 30.0) -> None:
        """Until the instance has left the API and its host's processes and files are gone."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listed = any(i["id"] == instance_id for i in self.instances())
            if not listed and not self.host_pids(instance_id) and not self.host_dir(instance_id).exists():
                return
            time.sleep(0.05)
        raise TimeoutError(f"instance {instance_id} still present after {timeout}s")

    # --- admin over HTTP -------------------------------------------------------------------

    def _mount_admin(self, router: Router) -> None:
        def guarded(fn):
            def handler(req: Request):
                if req.headers.get("x-sim-admin") != self.admin_token:
                    return json_response({"error": "admin token required (X-Sim-Admin)"}, 403)
                return fn(req)

            return handler

        def state(req):
            return json_response(self.world.snapshot())

        def fault(req):
            body = req.json() or {}
            try:
                self.inject(body["target"], body["kind"], int(body.get("times", 1)), float(body.get("delay", 5.0)))
            except (KeyError, ValueError) as e:
                return json_response({"error": str(e)}, 400)
            return json_response({"ok": True})

        def capacity(req):
            body = req.json() or {}
            self.set_capacity(body["cloud"], body["type"], int(body["slots"]), body.get("region"))
            return json_response({"ok": True})

        def hub(req):
            body = req.json() or {}
            try:  # all of the file or nothing
                entries = hub_models.parse(body.get("yaml") or "", body.get("source") or "the posted file")
            except hub_models.BadHubEntry as e:
                return json_response({"error": str(e)}, 400)
            self.add_hub_models(entries)
            return json_response({"ok": True, "models": [m.repo_id for m in entries]})

        def stop(req):
            if not self.stoppable:
                return json_response(
                    {"error": f"this simulator runs inside another program (pid {os.getpid()}): stop it there"}, 409
                )
            live = [i for i in self.world.snapshot()["instances"] if i["status"].lower() not in ENDED_STATUSES]
            if live:  # checked here, where no launch can come between the check and the stop
                running = ", ".join(f"{i['cloud']} {i['name']} ({i['id']}, {i['status']})" for i in live)
                return json_response(
                    {"error": f"the simulator still runs {running}; stopping it would take their hosts from under "
                     "their sessions: end them first (`gpu-session down`, or `gpu-session down --stack STACK` for each)"},
                    409,
                )  # fmt: skip
            self.stop_requested.set()
            return json_response({"ok": True, "pid": os.getpid()})

        def instance_fault(req):
            action = {"kill": self.kill_instance, "unhealthy": self.make_unhealthy}.get(req.params["action"])
            if action is None or req.params["id"] not in self.world.instances:
                return json_response({"error": "unknown instance or action"}, 404)
            action(req.params["id"])
            return json_response({"ok": True})

        router.add("GET", "/_sim/state", guarded(state))
        router.add("POST", "/_sim/faults", guarded(fault))
        router.add("POST", "/_sim/capacity", guarded(capacity))
        router.add("POST", "/_sim/hub", guarded(hub))
        router.add("POST", "/_sim/instances/{id}/{action}", guarded(instance_fault))
        router.add("POST", "/_sim/stop", guarded(stop))

    def _write_info(self) -> None:
        """sim.json (0600): how `invoke sim --list` and other processes find this simulator."""
        info = self.state_dir / "sim.json"
        fd = os.open(info, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "url": self.url, "admin_token": self.admin_token, "env": self.env()}, f)

    def close(self) -> None:
        self.server.close()
        self.world.close()
        (self.state_dir / "sim.json").unlink(missing_ok=True)
        # Deleted volumes' folders go last: `invoke sim --stop` waits only for sim.json, and a big one
        # takes a while. The trash never outlives the simulator (a killed one's: --cleanup, or the next start).
        self.world.empty_trash()

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
