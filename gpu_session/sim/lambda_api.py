"""Lambda Cloud public API v1 (research/cloud-apis.md §1): envelopes, error codes, rate limits."""

from __future__ import annotations

import base64
import re
import secrets
import subprocess
import tempfile
import time
from pathlib import Path

from . import catalog
from .faults import with_faults
from .hosts import Hosts
from .http import Handler, Request, Response, Router, json_response
from .world import SimInstance, SimVolume, SshKey, World

PREFIX = "/api/v1"
HOSTNAME_RE = re.compile(r"^[a-z0-9][0-9a-z-]{0,62}$")
FILESYSTEM_NAME_RE = re.compile(r"^[a-zA-Z]+[0-9a-zA-Z-]*$")  # 1..60 (spec v1.10.0)
# Who created the simulator's filesystems (Filesystem.created_by): one user per simulated account.
ACCOUNT_USER = {"id": "5c4ea5e2b2d04d3e9f3b1a7e2c0d9f11", "email": "sim@example.com", "status": "active"}
PUBKEY_RE = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com) [A-Za-z0-9+/=]+( .*)?$")

MESSAGES = {
    "global/invalid-api-key": (
        "API key was invalid, expired, or deleted.",
        "Check your API key or create a new one, then try again.",
    ),
    "global/account-inactive": (
        "Your account is inactive.",
        "Make sure you have verified your email address and have a valid payment method. Contact Support if problems continue.",
    ),
    "global/internal-error": ("An internal server error occurred.", "Try again later. Contact Support if the problem persists."),
    "instance-operations/launch/insufficient-capacity": ("Not enough capacity to fulfill launch request.", None),
    "global/rate-limited": ("Too many requests.", "Slow down and try again."),
    # What Lambda answers (HTTP 500) to a terminate of an instance that is already terminating or
    # terminated: seen in the field, and by SkyPilot (skypilot-org/skypilot#3410).
    "global/unknown": ("An unknown error occurred.", None),
}


def error(status: int, code: str, message: str | None = None, suggestion: str | None = None) -> Response:
    default_msg, default_sugg = MESSAGES.get(code, ("Invalid request data.", None))
    body = {"code": code, "message": message or default_msg}
    if suggestion or default_sugg:
        body["suggestion"] = suggestion or default_sugg
    return json_response({"error": body}, status)


def data(payload, status: int = 200) -> Response:
    return json_response({"data": payload}, status)


def status_error(status: int) -> Response:
    if status == 429:
        return error(429, "global/rate-limited")
    if status == 500:
        return error(500, "global/internal-error")
    return error(status, "provider/internal-unavailable", "Provider unavailable", "Try again shortly")


def capacity_error() -> Response:
    return error(400, "instance-operations/launch/insufficient-capacity")


def region_json(name: str) -> dict:
    return {"name": name, "description": catalog.LAMBDA_REGIONS[name]}


def type_json(t: catalog.LambdaType) -> dict:
    return {
        "name": t.name,
        "description": t.description,
        "gpu_description": t.gpu_description,
        "price_cents_per_hour": t.price_cents_per_hour,
        "specs": {"vcpus": t.vcpus, "memory_gib": t.memory_gib, "storage_gib": t.storage_gib, "gpus": t.gpus},
    }


def instance_json(inst: SimInstance, loopback: bool, world: World) -> dict:
    t = catalog.lambda_type(inst.type_name)
    available = inst.status == "active"
    reason = {"booting": "vm-has-not-launched", "terminating": "vm-is-terminating"}.get(inst.status, "vm-action-in-progress")
    action = (
        {"available": True}
        if available
        else {"available": False, "reason_code": reason, "reason_description": f"Instance is {inst.status}."}
    )
    filesystems = [fs for fs in map(world.volumes.get, inst.volume_ids) if fs is not None]
    out = {
        "id": inst.id,
        "status": inst.status,
        "ssh_key_names": inst.ssh_key_names,
        "file_system_names": [fs.name for fs in filesystems],
        "region": region_json(inst.region),
        "instance_type": type_json(t),
        "actions": {k: action for k in ("migrate", "rebuild", "restart", "cold_reboot")}
        | {"terminate": {"available": inst.status in ("booting", "active", "unhealthy")}},
        "is_reserved": False,
        "tags": inst.tags,
    }
    if filesystems:  # omitted when none (spec v1.10.0)
        out["file_system_mounts"] = [{"mount_point": mount_point(fs.name), "file_system_id": fs.id} for fs in filesystems]
    if inst.name:
        out["name"] = inst.name
    if inst.status == "active" and inst.address:
        token = inst.id[:32]
        out |= {
            "ip": inst.address,
            "private_ip": inst.address,
            "hostname": inst.hostname or inst.address,
            "jupyter_token": token,
            "jupyter_url": f"https://jupyter-{inst.id[:12]}.lambdaspaces.com/?token={token}",
        }
        if loopback:  # simulator-only: unprivileged hosts listen elsewhere than 22, as the current user
            out |= {"ssh_port": inst.ssh_port, "ssh_user": inst.ssh_user}
    return out


def mount_point(fs_name: str) -> str:
    return f"/lambda/nfs/{fs_name}"


def filesystem_json(world: World, fs: SimVolume) -> dict:
    return {
        "id": fs.id,
        "name": fs.name,
        "mount_point": mount_point(fs.name),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(fs.created_at)),
        "created_by": ACCOUNT_USER,
        "is_in_use": bool(world.volume_users(fs)),
        "region": region_json(fs.region),
        "bytes_used": world.volume_bytes(fs),  # what its folder really holds
    }


def key_json(k: SshKey) -> dict:
    return {"id": k.id, "name": k.name, "public_key": k.public_key}


def auth_key(req: Request) -> str | None:
    """The API key in the Authorization header: Bearer, Basic base64("KEY:"), or a raw key after Basic."""
    header = req.headers.get("authorization", "")
    scheme, _, cred = header.partition(" ")
    if scheme.lower() == "bearer":
        return cred.strip()
    if scheme.lower() == "basic":
        try:
            user = base64.b64decode(cred, validate=True).decode().split(":", 1)
            if len(user) == 2:
                return user[0]
        except (ValueError, UnicodeDecodeError):
            pass
        return cred.strip()  # the spec also lists a raw key after "Basic"
    return None


class Api:
    """Handlers over the world, one per operation; `mount` puts auth, rate limits and faults in front."""

    def __init__(self, world: World):
        self.world = world
        self.loopback = not world.hosts.isolated

    # --- access ----------------------------------------------------------------------------

    def refusal(self, req: Request, limited: str) -> Response | None:
        """The 401, 403 or 429 answer for this caller, or None when the request may go on."""
        world = self.world
        key = auth_key(req)
        if not key or (key not in world.lambda_keys and key not in world.inactive_keys):
            return error(401, "global/invalid-api-key")
        if key in world.inactive_keys:
            return error(403, "global/account-inactive")
        cfg = world.config
        if not world.limiter.allow(("lambda", key), cfg.lambda_rate, cfg.lambda_burst):
            return status_error(429)
        if limited == "launch" and not world.limiter.allow(
            ("lambda-launch", key), cfg.lambda_launch_rate, cfg.lambda_launch_burst
        ):
            return status_error(429)
        return None

    def _ids(self, req: Request) -> tuple[list[SimInstance] | None, Response | None]:
        """The instances named by the body's `instance_ids`, or the error that answers instead."""
        body = req.json()
        ids = body.get("instance_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            return None, error(400, "global/invalid-parameters", "instance_ids: a non-empty list of instance ids is required.")
        found = [self.world.find("lambda", i) for i in ids]
        missing = [i for i, f in zip(ids, found) if f is None]
        if missing:
            return None, error(404, "global/object-does-not-exist", f"Specified instance(s) do not exist: {', '.join(missing)}.")
        return found, None

    # --- instances -------------------------------------------------------------------------

    def list_instances(self, req: Request) -> Response:
        """GET /instances"""
        return data(
            [instance_json(i, self.loopback, self.world) for i in self.world.listing("lambda") if i.status != "terminated"]
        )

    def get_instance(self, req: Request) -> Response:
        """GET /instances/{id}"""
        inst = self.world.find("lambda", req.params["id"])
        if inst is None:
            return error(404, "global/object-does-not-exist", "Specified instance does not exist.")
        return data(instance_json(inst, self.loopback, self.world))

    def rename_instance(self, req: Request) -> Response:
        """POST /instances/{id}"""
        inst = self.world.find("lambda", req.params["id"])
        if inst is None:
            return error(404, "global/object-does-not-exist", "Specified instance does not exist.")
        body = req.json()
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or len(name) > 64:
            return error(400, "global/invalid-parameters", "name: must be a string of at most 64 characters")
        inst.name = name
        return data(instance_json(inst, self.loopback, self.world))

    def launch(self, req: Request) -> Response:
        """POST /instance-operations/launch"""
        world = self.world
        body = req.json()
        if not isinstance(body, dict):
            return error(400, "global/invalid-parameters", "Request body must be a JSON object.")
        missing = [f for f in ("region_name", "instance_type_name", "ssh_key_names") if f not in body]
        if missing:
            return error(400, "global/invalid-parameters", f"Missing required field(s): {', '.join(missing)}.")
        keys = body["ssh_key_names"]
        if not isinstance(keys, list) or len(keys) != 1 or not isinstance(keys[0], str):
            return error(400, "global/invalid-parameters", "ssh_key_names: Currently, exactly one SSH key must be specified.")
        name = body.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > 64):
            return error(400, "global/invalid-parameters", "name: must be a string of at most 64 characters.")
        hostname = body.get("hostname")
        if hostname is not None and not (isinstance(hostname, str) and HOSTNAME_RE.match(hostname)):
            return error(400, "global/invalid-parameters", f"hostname: must match {HOSTNAME_RE.pattern}.")
        user_data = body.get("user_data")
        if user_data is not None and (not isinstance(user_data, str) or len(user_data.encode()) > 1_000_000):
            return error(400, "global/invalid-parameters", "user_data: must be a string of at most 1 MB.")
        quantity = body.get("quantity", 1)
        if not isinstance(quantity, int) or quantity < 1:
            return error(400, "global/invalid-parameters", "quantity: must be a positive integer.")
        t = catalog.lambda_type(body["instance_type_name"])
        if t is None:
            return error(
                404,
                "global/object-does-not-exist",
                f"Specified instance type {body['instance_type_name']!r} does not exist.",
                "Use GET /instance-types for the valid names.",
            )
        region = body["region_name"]
        if region not in catalog.LAMBDA_REGIONS:
            return error(
                404,
                "global/object-does-not-exist",
                f"Specified region {region!r} does not exist.",
                "Use GET /regions for the valid names.",
            )
        key = next((k for k in world.ssh_keys.values() if k.name == keys[0]), None)
        if key is None:
            return error(
                404,
                "global/object-does-not-exist",
                f"Specified SSH key {keys[0]!r} does not exist.",
                "Add the key with POST /ssh-keys first.",
            )
        fs_names = body.get("file_system_names") or []
        if not isinstance(fs_names, list) or not all(isinstance(n, str) for n in fs_names):
            return error(400, "global/invalid-parameters", "file_system_names: must be a list of filesystem names.")
        filesystems = []
        for fs_name in fs_names:
            fs = next((v for v in world.volume_listing("lambda") if v.name == fs_name), None)
            if fs is None:
                return error(
                    404,
                    "global/object-does-not-exist",
                    f"Specified file system {fs_name!r} does not exist.",
                    "Create it with POST /filesystems first.",
                )
            if fs.region != region:
                return error(
                    400,
                    "instance-operations/launch/file-system-in-wrong-region",
                    f"File system {fs_name!r} is in {fs.region}, not {region}.",
                    "Launch in the file system's region.",
                )
            filesystems.append(fs)
        if filesystems and (refusal := Hosts.mount_refusal(mount_point(filesystems[0].name), not self.loopback)):
            return error(400, "global/invalid-parameters", f"Simulator: {refusal}.")
        with world.lock:
            if world.free_slots("lambda", t.name, region) < quantity:
                return capacity_error()
            for _ in range(quantity):
                world.take_slot("lambda", t.name, region)
        ids = []
        for _ in range(quantity):
            inst = world.new_instance(
                "lambda",
                name=name or "",
                type_name=t.name,
                region=region,
                gpu_count=t.gpus,
                price_per_hour=t.price_cents_per_hour / 100,
                status="booting",
                ssh_key_names=[key.name],
                authorized_keys=[key.public_key],
                user_data=user_data,
                image=str(body.get("image") or ""),
                hostname=hostname,
                tags=body.get("tags") or [],
                volume_ids=[fs.id for fs in filesystems],
            )
            ids.append(inst.id)
        return data({"instance_ids": ids})

    def terminate(self, req: Request) -> Response:
        """POST /instance-operations/terminate"""
        insts, err = self._ids(req)
        if err:
            return err
        # An instance already on its way out makes the whole request fail, as Lambda's does: no
        # "already terminating" code, only global/unknown (a client must look at the instance).
        if any(i.status in ("terminating", "terminated") for i in insts):
            return error(500, "global/unknown")
        for inst in insts:
            self.world.terminate(inst)
        return data({"terminated_instances": [instance_json(i, self.loopback, self.world) for i in insts]})

    def restart(self, req: Request) -> Response:
        """POST /instance-operations/restart"""
        insts, err = self._ids(req)
        if err:
            return err
        busy = [i.id for i in insts if i.status != "active"]
        if busy:
            return error(409, "global/conflict", f"Instance(s) not active: {', '.join(busy)}.")
        for inst in insts:
            self.world.restart(inst)
        return data({"restarted_instances": [instance_json(i, self.loopback, self.world) for i in insts]})

    def instance_types(self, req: Request) -> Response:
        """GET /instance-types"""
        out = {}
        for t in catalog.LAMBDA_TYPES:
            regions = [region_json(r) for r in catalog.LAMBDA_REGIONS if self.world.free_slots("lambda", t.name, r) > 0]
            out[t.name] = {"instance_type": type_json(t), "regions_with_capacity_available": regions}
        return data(out)

    # --- ssh keys --------------------------------------------------------------------------

    def list_keys(self, req: Request) -> Response:
        """GET /ssh-keys"""
        return data([key_json(k) for k in self.world.ssh_keys.values()])

    def add_key(self, req: Request) -> Response:
        """POST /ssh-keys"""
        world = self.world
        body = req.json()
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not 1 <= len(body["name"]) <= 64:
            return error(400, "global/invalid-parameters", "name: a string of 1 to 64 characters is required.")
        if any(k.name == body["name"] for k in world.ssh_keys.values()):
            return error(400, "global/invalid-parameters", f"An SSH key named {body['name']!r} already exists.")
        public = body.get("public_key")
        private = None
        if public is None:
            public, private = _generate_key(body["name"])
        elif not isinstance(public, str) or len(public) > 4096 or not PUBKEY_RE.match(public.strip()):
            return error(400, "global/invalid-parameters", "public_key: not a valid SSH public key.")
        key = SshKey(secrets.token_hex(16), body["name"], public.strip())
        with world.lock:
            world.ssh_keys[key.id] = key
        world.record("ssh_key_added", id=key.id, name=key.name)
        return data(key_json(key) | ({"private_key": private} if private else {}))

    def delete_key(self, req: Request) -> Response:
        """DELETE /ssh-keys/{id}"""
        world = self.world
        with world.lock:
            key = world.ssh_keys.pop(req.params["id"], None)
        if key is None:
            return error(404, "global/not-found", "The requested resource was not found.")
        world.record("ssh_key_deleted", id=key.id, name=key.name)
        return data({})

    # --- catalog ---------------------------------------------------------------------------

    def regions(self, req: Request) -> Response:
        """GET /regions"""
        return data([region_json(r) for r in catalog.LAMBDA_REGIONS])

    def images(self, req: Request) -> Response:
        """GET /images"""
        return data(
            [
                {
                    "id": f"00000000-0000-4000-8000-{i:012d}",
                    "created_time": "2025-01-01T00:00:00Z",
                    "updated_time": "2025-01-01T00:00:00Z",
                    "name": img["name"],
                    "description": img["name"],
                    "family": img["family"],
                    "version": img["version"],
                    "architecture": "x86_64",
                    "region": region_json(r),
                }
                for i, (img, r) in enumerate((img, r) for img in catalog.LAMBDA_IMAGES for r in catalog.LAMBDA_REGIONS)
            ]
        )

    # --- filesystems -----------------------------------------------------------------------

    def file_systems(self, req: Request) -> Response:
        """GET /file-systems"""
        return data([filesystem_json(self.world, fs) for fs in self.world.volume_listing("lambda")])

    def create_file_system(self, req: Request) -> Response:
        """POST /filesystems"""
        world = self.world
        body = req.json()
        if not isinstance(body, dict):
            return error(400, "global/invalid-parameters", "Request body must be a JSON object.")
        name, region = body.get("name"), body.get("region")
        if not isinstance(name, str) or not 1 <= len(name) <= 60 or not FILESYSTEM_NAME_RE.match(name):
            return error(400, "global/invalid-parameters", f"name: must match {FILESYSTEM_NAME_RE.pattern} (1 to 60 characters).")
        if not isinstance(region, str) or region not in catalog.LAMBDA_REGIONS:
            return error(400, "global/invalid-parameters", f"region: {region!r} is not a valid region.")
        with world.lock:
            if any(fs.name == name for fs in world.volume_listing("lambda")):
                return error(400, "global/duplicate", f"A file system named {name!r} already exists.")
            fs = world.new_volume("lambda", name, region)
        return data(filesystem_json(world, fs))

    def delete_file_system(self, req: Request) -> Response:
        """DELETE /filesystems/{id}"""
        world = self.world
        with world.lock:
            fs = world.find_volume("lambda", req.params["id"])
            if fs is None:
                return error(404, "global/object-does-not-exist", "Specified file system does not exist.")
            users = world.volume_users(fs)
            if users:
                return error(
                    400,
                    "filesystems/filesystem-in-use",
                    f"File system {fs.name!r} is in use by instance(s) {', '.join(i.id for i in users)}.",
                    "Terminate the instances that use it first.",
                )
            world.delete_volume(fs)
        return data({"deleted_ids": [fs.id]})

    def routes(self) -> list[tuple[str, str, Handler, str]]:
        """(method, path under PREFIX, handler, rate-limit class)."""
        return [
            ("GET", "/instances", self.list_instances, "general"),
            ("GET", "/instances/{id}", self.get_instance, "general"),
            ("POST", "/instances/{id}", self.rename_instance, "general"),
            ("POST", "/instance-operations/launch", self.launch, "launch"),
            ("POST", "/instance-operations/terminate", self.terminate, "general"),
            ("POST", "/instance-operations/restart", self.restart, "general"),
            ("GET", "/instance-types", self.instance_types, "general"),
            ("GET", "/ssh-keys", self.list_keys, "general"),
            ("POST", "/ssh-keys", self.add_key, "general"),
            ("DELETE", "/ssh-keys/{id}", self.delete_key, "general"),
            ("GET", "/regions", self.regions, "general"),
            ("GET", "/images", self.images, "general"),
            ("GET", "/file-systems", self.file_systems, "general"),
            ("POST", "/filesystems", self.create_file_system, "general"),
            ("DELETE", "/filesystems/{id}", self.delete_file_system, "general"),
        ]


def mount(router: Router, world: World) -> None:
    api = Api(world)

    def guard(handler: Handler, limited: str) -> Handler:
        def guarded(req: Request) -> Response:
            refused = api.refusal(req, limited)
            return refused if refused is not None else handler(req)

        return guarded

    for method, pattern, handler, limited in api.routes():
        inner = with_faults(world, "lambda", pattern.strip("/"), handler, status_error, capacity_error)
        router.add(method, PREFIX + pattern, guard(inner, limited))


def _generate_key(name: str) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)], check=True)
        return path.with_suffix(".pub").read_text().strip(), path.read_text()
