"""Lambda Cloud over its public REST API v1 (research/cloud-apis.md §1).

Quirks kept here: instance types come as an object keyed by name; `ip` is absent until `active`;
errors carry a `code` we branch on (never the message); launches are rate-limited to one per 12 s,
so capacity is checked with /instance-types before a launch is spent.
"""

from __future__ import annotations

import dataclasses
import os
import re

import requests

from .base import (
    AuthError,
    CapacityError,
    Cloud,
    CloudError,
    Instance,
    InvalidRequest,
    LaunchSpec,
    NotFound,
    Offer,
    RateLimited,
    RetryPolicy,
    SshEndpoint,
    SshKeyInfo,
    Status,
    Volume,
    VolumeInUse,
    unreachable,
    validate_name,
    with_retries,
)

DEFAULT_BASE = "https://cloud.lambda.ai/api/v1"
STATUS = {
    "booting": Status.PENDING,
    "active": Status.RUNNING,
    "unhealthy": Status.UNHEALTHY,
    "terminating": Status.TERMINATING,
    "terminated": Status.TERMINATED,
    "preempted": Status.TERMINATED,
}
VRAM_RE = re.compile(r"\((\d+) GB")
# Lambda's rule for filesystem names (its OpenAPI spec v1.10.0, FilesystemCreateRequest.name).
FILESYSTEM_NAME_RE = re.compile(r"^[a-zA-Z]+[0-9a-zA-Z-]*$")
FILESYSTEM_NAME_MAX = 60


class LambdaCloud(Cloud):
    name = "lambda"
    ssh_user = "ubuntu"
    registers_ssh_keys = True
    takes_host_key = True
    runs_container_image = False
    host_ends_itself = False
    # Persistent storage: $0.20 per GB-month, on what the filesystem holds (lambda.ai/pricing, "Persistent
    # storage"; not found in our stored docs, so taken from that page as quoted to us), billed in 1-hour
    # increments (research/cloud-apis.md §1.5, from Lambda's billing docs).
    volume_price_per_gb_month = 0.20
    sizes_volumes = False

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        poll_interval: float = 2.0,
        launch_interval: float = 12.0,
    ):
        # Documented limits: 1 request/s and 1 launch per 12 s; retries never come faster than that.
        super().__init__(retry or RetryPolicy(floor=1.0), poll_interval)
        self.launch_interval = launch_interval
        key = api_key or os.environ.get("LAMBDA_API_KEY")
        if not key:
            raise AuthError(
                "no Lambda Cloud API key: set LAMBDA_API_KEY or `lambdaApiKey` in the config "
                "(create one at https://cloud.lambda.ai/api-keys)"
            )
        self.base = (base_url or os.environ.get("LAMBDA_API_BASE") or DEFAULT_BASE).rstrip("/")
        self.timeout = timeout
        self._http = requests.Session()
        self._http.headers["Authorization"] = f"Bearer {key}"

    # --- transport -------------------------------------------------------------------------

    def _once(self, method: str, path: str, body: dict | None = None):
        try:
            resp = self._http.request(method, self.base + path, json=body, timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise unreachable(f"Lambda API {method} {path}", e) from None
        try:
            payload = resp.json()
        except ValueError:
            payload = None
        if resp.ok and isinstance(payload, dict) and "data" in payload:
            return payload["data"]
        err = (payload or {}).get("error") if isinstance(payload, dict) else None
        err = err if isinstance(err, dict) else {}
        code, message = err.get("code", ""), err.get("message") or resp.reason
        text = f"Lambda API {method} {path}: {code or resp.status_code}: {message}"
        if err.get("suggestion"):
            text += f" ({err['suggestion']})"
        if resp.status_code == 429:
            raise RateLimited(text)
        if resp.status_code >= 500:
            raise CloudError(text, retryable=True)
        if resp.status_code == 401 or code in ("global/invalid-api-key", "global/account-inactive", "global/invalid-address"):
            raise AuthError(text + ". Check LAMBDA_API_KEY.")
        if code == "instance-operations/launch/insufficient-capacity":
            raise CapacityError(text)
        if code == "filesystems/filesystem-in-use":
            raise VolumeInUse(text)
        if resp.status_code == 404 or code in ("global/object-does-not-exist", "global/not-found"):
            raise NotFound(text)
        if resp.status_code == 400:
            raise InvalidRequest(text)
        raise CloudError(text)

    def _call(self, method: str, path: str, body: dict | None = None):
        return with_retries(lambda: self._once(method, path, body), self.retry, f"Lambda {method} {path}")

    # --- offers ----------------------------------------------------------------------------

    def offers(self) -> list[Offer]:
        out = []
        for name, entry in self._call("GET", "/instance-types").items():
            t = entry["instance_type"]
            vram = VRAM_RE.search(t.get("gpu_description", ""))
            out.append(
                Offer(
                    cloud=self.name,
                    gpu_name=t.get("gpu_description", name).split(" (")[0],
                    instance_type=name,
                    gpu_count=int(t["specs"]["gpus"]),
                    vram_gb=int(vram.group(1)) if vram else 0,
                    price_per_hour=t["price_cents_per_hour"] / 100,
                    regions=tuple(r["name"] for r in entry.get("regions_with_capacity_available") or []),
                )
            )
        return out

    # --- instances -------------------------------------------------------------------------

    def _ssh_endpoint(self, d: dict) -> SshEndpoint:
        """Port 22 as the image's user: all that Lambda's API implies. The one seam for the
        simulator's unprivileged fallback (`invoke sim --loopback`), whose hosts share 127.0.0.1
        and differ by port and user: it adds `ssh_port` and `ssh_user`, keys Lambda never sends."""
        return SshEndpoint(d["ip"], int(d.get("ssh_port", 22)), d.get("ssh_user") or self.ssh_user)

    def _instance(self, d: dict) -> Instance:
        t = d.get("instance_type") or {}
        status = d.get("status", "")
        endpoint = None
        if status == "active" and d.get("ip"):  # ip is unusable (or absent) until active
            endpoint = self._ssh_endpoint(d)
        return Instance(
            id=d["id"],
            name=d.get("name") or "",
            status=STATUS.get(status, Status.PENDING),
            raw_status=status,
            instance_type=t.get("name", ""),
            gpu_name=t.get("gpu_description", "").split(" (")[0],
            gpu_count=int((t.get("specs") or {}).get("gpus", 0)),
            region=(d.get("region") or {}).get("name", ""),
            price_per_hour=t.get("price_cents_per_hour", 0) / 100,
            endpoint=endpoint,
        )

    def get(self, instance_id: str) -> Instance:
        return self._instance(self._call("GET", f"/instances/{instance_id}"))

    def list(self, name_prefix: str = "") -> list[Instance]:
        return [i for i in map(self._instance, self._call("GET", "/instances")) if i.name.startswith(name_prefix)]

    def _check_launch(self, spec: LaunchSpec) -> LaunchSpec:
        validate_name(spec.name)
        if not spec.ssh_key_name:
            raise InvalidRequest("Lambda launches need exactly one registered SSH key: register_ssh_key() first")
        if spec.spot:
            raise InvalidRequest("Lambda Cloud has no spot instances: leave spot off")
        if spec.user_data is not None and len(spec.user_data.encode()) > 1_000_000:
            raise InvalidRequest("user_data is larger than Lambda's 1 MB limit")
        volume = spec.volume
        if volume is not None:
            if volume.cloud != self.name:
                raise InvalidRequest(f"volume {volume.name!r} is a {volume.cloud} volume, not a Lambda filesystem")
            if spec.region and spec.region != volume.region:
                raise InvalidRequest(
                    f"filesystem {volume.name!r} is in {volume.region}: an instance can only attach it there, "
                    f"not in {spec.region}"
                )
            spec = dataclasses.replace(spec, region=volume.region)  # where the volume is, capacity or not
        offers = {o.instance_type: o for o in self.offers()}
        offer = offers.get(spec.instance_type)
        if offer is None:
            raise InvalidRequest(f"unknown Lambda instance type {spec.instance_type!r}; valid: {', '.join(sorted(offers))}")
        # Spending the launch rate limit on a launch that cannot succeed helps nobody: check first.
        if not offer.regions or (spec.region and spec.region not in offer.regions):
            elsewhere = [
                f"{o.instance_type} in {', '.join(o.regions)} (${o.price_per_hour:.2f}/h)"
                for o in offers.values()
                if o.regions and o.total_vram_gb >= offer.total_vram_gb
            ]
            if offer.regions:
                elsewhere.insert(0, f"{offer.instance_type} in {', '.join(offer.regions)}")
            where = f" in {spec.region}" if spec.region else ""
            if volume is not None:
                where += f" (where filesystem {volume.name!r} is)"
            raise CapacityError(f"Lambda has no {spec.instance_type} capacity{where}.", elsewhere)
        region = spec.region or offer.regions[0]
        return dataclasses.replace(spec, region=region)

    def _launch_once(self, spec: LaunchSpec) -> str:
        body = {
            "region_name": spec.region,
            "instance_type_name": spec.instance_type,
            "ssh_key_names": [spec.ssh_key_name],
            "name": spec.name,
        }
        if spec.user_data:
            body["user_data"] = spec.user_data
        if spec.image:
            body["image"] = {"family": spec.image}
        if spec.volume is not None:
            body["file_system_names"] = [spec.volume.name]
        ids = self._once("POST", "/instance-operations/launch", body)["instance_ids"]
        return ids[0]

    def _terminate_once(self, instance_id: str) -> None:
        self._once("POST", "/instance-operations/terminate", {"instance_ids": [instance_id]})

    # --- SSH keys --------------------------------------------------------------------------

    def list_ssh_keys(self) -> list[SshKeyInfo]:
        return [SshKeyInfo(k["id"], k["name"], k.get("public_key", "")) for k in self._call("GET", "/ssh-keys")]

    def register_ssh_key(self, name: str, public_key: str) -> SshKeyInfo:
        """Register, or adopt a key already registered under this name with the same public key."""
        validate_name(name, "SSH key name")
        existing = next((k for k in self.list_ssh_keys() if k.name == name), None)
        if existing is not None:
            if existing.public_key.split()[:2] == public_key.split()[:2]:
                return existing
            raise InvalidRequest(f"a different Lambda SSH key is already registered as {name!r}")
        try:
            k = self._once("POST", "/ssh-keys", {"name": name, "public_key": public_key.strip()})
        except CloudError as e:
            if not e.retryable:
                raise
            # Ambiguous: maybe it was registered. Look, then try once more.
            again = next((k for k in self.list_ssh_keys() if k.name == name), None)
            if again is not None:
                return again
            k = self._call("POST", "/ssh-keys", {"name": name, "public_key": public_key.strip()})
        return SshKeyInfo(k["id"], k["name"], k.get("public_key", ""))

    def delete_ssh_key(self, key_id: str) -> None:
        self._call("DELETE", f"/ssh-keys/{key_id}")

    # --- filesystems (volumes) --------------------------------------------------------------

    def _volume(self, d: dict) -> Volume:
        name = d["name"]
        used = d.get("bytes_used")
        return Volume(
            id=d["id"],
            name=name,
            cloud=self.name,
            region=(d.get("region") or {}).get("name", ""),
            size_gb=None,  # a Lambda filesystem has no size: it grows with use
            bytes_used=int(used) if used is not None else None,
            in_use=bool(d.get("is_in_use")),
            mount_point=d.get("mount_point") or f"/lambda/nfs/{name}",
        )

    def volumes(self) -> list[Volume]:
        return [self._volume(d) for d in self._call("GET", "/file-systems")]  # the list's legacy spelling

    def _check_volume(self, name: str, region: str, size_gb: int | None) -> None:
        """size_gb is not sent (a Lambda filesystem has no size); any positive one is accepted, so a
        caller can ask both clouds the same."""
        if not (isinstance(name, str) and 1 <= len(name) <= FILESYSTEM_NAME_MAX and FILESYSTEM_NAME_RE.match(name)):
            raise InvalidRequest(
                f"invalid Lambda filesystem name {name!r}: 1-{FILESYSTEM_NAME_MAX} characters, letters first, "
                "then letters, digits or '-'"
            )
        if not isinstance(region, str) or not region or not re.match(r"^[a-z0-9-]+$", region):
            raise InvalidRequest(f"invalid Lambda region {region!r}")
        if size_gb is not None and (not isinstance(size_gb, int) or isinstance(size_gb, bool) or size_gb < 1):
            raise InvalidRequest(f"invalid volume size {size_gb!r}: a positive whole number of GB, or None")

    def _create_volume_once(self, name: str, region: str, size_gb: int | None) -> Volume:
        return self._volume(self._once("POST", "/filesystems", {"name": name, "region": region}))

    def _delete_volume_once(self, volume_id: str) -> None:
        if not re.match(r"^[0-9A-Za-z-]+$", volume_id or ""):
            raise InvalidRequest(f"invalid Lambda filesystem id {volume_id!r}")
        self._once("DELETE", f"/filesystems/{volume_id}")
