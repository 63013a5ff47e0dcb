"""RunPod over the official `runpod` SDK (GraphQL; research/cloud-apis.md §2).

Quirks kept here: the SDK takes its key from a module global (we set it from our config on every
call and never let it come from ~/.runpod), reads RUNPOD_API_BASE_URL on every call, hides HTTP
statuses behind QueryError messages, and inlines strings into GraphQL without escaping them, so
names and environment values with quotes, backslashes or newlines are refused before any call.
A pod reads RUNNING with `runtime: null` until its container is up; it is ready when
`runtime.ports` has the public TCP entry for private port 22.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from contextlib import contextmanager

import requests

from .base import (
    ANY_REGION,
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
    Status,
    Volume,
    VolumeInUse,
    unreachable,
    validate_name,
    with_retries,
)

# Network volumes live in RunPod's REST API (v1; the SDK 1.12 has no call for them), at another
# address than GraphQL: REST_BASE_ENV points it elsewhere (the simulator), as RUNPOD_API_BASE_URL does GraphQL.
REST_BASE_ENV = "RUNPOD_REST_API_BASE_URL"
DEFAULT_REST_BASE = "https://rest.runpod.io/v1"
# Where a pod sees its network volume: RunPod's convention (its templates and docs mount it there).
VOLUME_MOUNT_PATH = "/workspace"
# Network volume sizes, whole GB. Our assumption, not a documented limit: the console starts at 10 GB
# and offers up to 4 TB (4000 GB); RunPod may accept more (ask support) or refuse less.
VOLUME_MIN_GB, VOLUME_MAX_GB = 10, 4000
DEFAULT_IMAGE = "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"
# The host CUDA versions a pod may land on (allowedCudaVersions in every deploy): our engines' locks
# (roles/model_server/files/engines/*-cuda.txt) take torch's CUDA 13 wheels, which need an NVIDIA
# driver >= 580 (CUDA 13.0's minimum, in NVIDIA's CUDA toolkit release notes); without the list
# RunPod places pods on hosts with older drivers too. "13.0" is the newest value RunPod's
# CudaVersion enum has; add newer ones as RunPod lists them.
CUDA_VERSIONS = ("13.0",)
UNSAFE = re.compile(r'["\\\n\r]')
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
STATUS = {
    "CREATED": Status.PENDING,
    "RESTARTING": Status.PENDING,
    "RUNNING": Status.PENDING,  # RUNNING only once runtime shows the SSH port (see _instance)
    "EXITED": Status.STOPPED,
    "PAUSED": Status.STOPPED,
    "DEAD": Status.UNHEALTHY,
    "TERMINATED": Status.TERMINATED,
}
POD_FIELDS = """id name desiredStatus costPerHr gpuCount imageName
  runtime { ports { ip isIpPublic privatePort publicPort type } }
  machine { gpuDisplayName dataCenterId }"""
_sdk_lock = threading.Lock()  # runpod.api_key is a module global


@contextmanager
def _root_logging_kept():
    """The root logger's handlers and level as they were before the block, whatever it set up."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@functools.cache
def _sdk():
    """The `runpod` SDK module, imported on first use, not with this module. Importing it costs
    about 1.2 s (runpod 1.12: its package imports the serverless worker, whose debugger calls
    py-cpuinfo's get_cpu_info at import, which probes the CPU in a subprocess) and calls
    logging.basicConfig(level=INFO); so a process that never calls RunPod (a Lambda session's
    Pulumi program and providers, a plan with --cloud lambda) pays neither."""
    with _root_logging_kept():
        import runpod
        import runpod.api.graphql
    return runpod


# The SDK's calls we make, by their SDK names (retries and errors name them).
def run_graphql_query(document: str) -> dict:
    return _sdk().api.graphql.run_graphql_query(document)


def create_pod(**kwargs) -> dict:
    return _sdk().create_pod(**kwargs)


def terminate_pod(pod_id: str) -> None:
    return _sdk().terminate_pod(pod_id)


# What RunPod (and GraphQL itself) says when it refuses a request before doing anything: the only
# messages taken as "nothing was created". Anything else is a failure we cannot read, after which a
# launch looks for the pod by its name (Cloud.launch).
REFUSALS = ("is required", "invalid", "minimum bid", "must provide", "syntax error", "cannot query field", "unknown argument")


def _classify(message: str) -> CloudError:
    m = message.lower()
    if "no longer any instances available" in m:
        return CapacityError(f"RunPod: {message}")
    if "not found" in m:
        return NotFound(f"RunPod: {message}")
    if "too many requests" in m or "rate limit" in m:
        return RateLimited(f"RunPod: {message}")
    if "something went wrong" in m or "try again later" in m or "internal" in m:
        return CloudError(f"RunPod: {message}", retryable=True)
    if "unauthorized" in m or "not authorized" in m:
        return AuthError(f"RunPod: {message}. Check RUNPOD_API_KEY.")
    if any(r in m for r in REFUSALS):
        return InvalidRequest(f"RunPod: {message}")
    return CloudError(
        f"RunPod answered an error we do not know: {message}. Try again; if it persists, check RunPod's status page"
    )


def _check_text(value: str, what: str) -> None:
    if UNSAFE.search(value):
        raise InvalidRequest(f"{what} may not contain quotes, backslashes or newlines (the RunPod SDK does not escape them)")


class RunpodCloud(Cloud):
    name = "runpod"
    ssh_user = "root"
    registers_ssh_keys = False  # the key goes into each pod as PUBLIC_KEY
    takes_host_key = False
    runs_container_image = True
    host_ends_itself = True
    # Network volumes: $0.07 per GB-month under 1 TB ($0.05 above), billed on the size
    # (runpod.io/pricing, "Network volume"; runpod/docs pods/storage/create-network-volumes.mdx:
    # "$0.07/GB/month rather than $0.10/GB/month" for pod disk).
    volume_price_per_gb_month = 0.07
    sizes_volumes = True

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        cloud_type: str = "SECURE",
        retry: RetryPolicy | None = None,
        poll_interval: float = 2.0,
        rest_base_url: str | None = None,
        timeout: float = 30.0,
    ):
        super().__init__(retry, poll_interval)
        self._key = api_key or os.environ.get("RUNPOD_API_KEY")
        if not self._key:
            raise AuthError(
                "no RunPod API key: set RUNPOD_API_KEY or `runpodApiKey` in the config "
                "(create one at https://www.runpod.io/console/user/settings)"
            )
        if base_url:
            os.environ["RUNPOD_API_BASE_URL"] = base_url.rstrip("/")  # the SDK's only knob, read per call
        if cloud_type not in ("SECURE", "COMMUNITY", "ALL"):
            raise InvalidRequest(f"cloud_type must be SECURE, COMMUNITY or ALL, not {cloud_type!r}")
        self.cloud_type = cloud_type
        # Read when a REST call is made, as the SDK reads RUNPOD_API_BASE_URL per call.
        self._rest_base = rest_base_url.rstrip("/") if rest_base_url else None
        self.timeout = timeout
        self._http = requests.Session()

    # --- transport -------------------------------------------------------------------------

    def _once(self, fn, *args, **kwargs):
        with _sdk_lock:
            runpod = _sdk()
            runpod.api_key = self._key  # ours, never what the SDK loaded from ~/.runpod
            try:
                return fn(*args, **kwargs)
            except runpod.error.AuthenticationError as e:
                raise AuthError(f"RunPod: {e}. Check RUNPOD_API_KEY.") from None
            except runpod.error.QueryError as e:
                raise _classify(str(e)) from None
            except (requests.ConnectionError, requests.Timeout) as e:
                raise unreachable("RunPod API", e) from None
            except requests.exceptions.JSONDecodeError:  # a gateway's HTML error page
                raise CloudError("RunPod API answered with an error page instead of JSON", retryable=True) from None
            except ValueError as e:  # the SDK's own checks, e.g. an unknown GPU id
                raise InvalidRequest(f"RunPod: {e}") from None
            finally:
                runpod.api_key = None

    def _call(self, fn, *args, **kwargs):
        return with_retries(lambda: self._once(fn, *args, **kwargs), self.retry, f"RunPod {fn.__name__}")

    def _query(self, document: str) -> dict:
        return self._call(run_graphql_query, document)["data"]

    # --- offers ----------------------------------------------------------------------------

    def offers(self) -> list[Offer]:
        price = {"SECURE": "securePrice", "COMMUNITY": "communityPrice", "ALL": "securePrice"}[self.cloud_type]
        spot = {"SECURE": "secureSpotPrice", "COMMUNITY": "communitySpotPrice", "ALL": "secureSpotPrice"}[self.cloud_type]
        gpus = self._query(
            f"query GpuTypes {{ gpuTypes {{ id displayName memoryInGb maxGpuCount {price} {spot} "
            "lowestPrice(input: {gpuCount: 1}) { stockStatus availableGpuCounts } } }"
        )["gpuTypes"]
        out = []
        for g in gpus:
            lowest = g.get("lowestPrice") or {}
            counts = set(lowest.get("availableGpuCounts") or [])
            for n in (1, 2, 4, 8):
                if n > (g.get("maxGpuCount") or 1):
                    continue
                regions = (ANY_REGION,) if lowest.get("stockStatus") and n in counts else ()
                for is_spot, per_gpu in ((False, g.get(price)), (True, g.get(spot))):
                    if per_gpu:
                        out.append(
                            Offer(
                                self.name,
                                g["displayName"],
                                g["id"],
                                n,
                                int(g["memoryInGb"]),
                                round(per_gpu * n, 3),
                                regions,
                                spot=is_spot,
                            )
                        )
        return out

    # --- instances -------------------------------------------------------------------------

    def _instance(self, p: dict) -> Instance:
        raw = p.get("desiredStatus") or ""
        status = STATUS.get(raw, Status.PENDING)
        endpoint = None
        for port in (p.get("runtime") or {}).get("ports") or []:
            if port.get("privatePort") == 22 and port.get("isIpPublic") and port.get("type") == "tcp":
                endpoint = SshEndpoint(port["ip"], int(port["publicPort"]), self.ssh_user)
        if raw == "RUNNING" and endpoint is not None:
            status = Status.RUNNING
        machine = p.get("machine") or {}
        return Instance(
            id=p["id"],
            name=p.get("name") or "",
            status=status,
            raw_status=raw,
            instance_type="",
            gpu_name=machine.get("gpuDisplayName") or "",
            gpu_count=int(p.get("gpuCount") or 0),
            region=machine.get("dataCenterId") or "",
            price_per_hour=float(p.get("costPerHr") or 0),
            endpoint=endpoint,
        )

    def get(self, instance_id: str) -> Instance:
        _check_text(instance_id, "pod id")
        pod = self._query(f'query pod {{ pod(input: {{podId: "{instance_id}"}}) {{ {POD_FIELDS} }} }}')["pod"]
        if pod is None:
            raise NotFound(f"RunPod pod {instance_id} does not exist")
        return self._instance(pod)

    def list(self, name_prefix: str = "") -> list[Instance]:
        pods = self._query(f"query myPods {{ myself {{ pods {{ {POD_FIELDS} }} }} }}")["myself"]["pods"] or []
        return [i for i in map(self._instance, pods) if i.name.startswith(name_prefix)]

    def _check_launch(self, spec: LaunchSpec) -> LaunchSpec:
        validate_name(spec.name)
        key = spec.ssh_public_key.strip()
        if not key or "\n" in key:
            raise InvalidRequest("RunPod launches need exactly one SSH public key (one line)")
        for k, v in spec.env.items():
            if not ENV_KEY_RE.match(k):
                raise InvalidRequest(f"invalid environment variable name {k!r}")
            _check_text(v, f"environment value of {k}")
        for value, what in ((spec.image or "", "image"), (spec.region or "", "region"), (spec.instance_type, "GPU type")):
            _check_text(value, what)
        offers = self.offers()
        if not any(o.instance_type == spec.instance_type and o.spot == spec.spot for o in offers):
            valid = sorted({o.instance_type for o in offers})
            raise InvalidRequest(f"unknown RunPod GPU type {spec.instance_type!r}; valid: {', '.join(valid)}")
        if spec.spot and spec.bid_per_gpu is None:
            raise InvalidRequest("a spot pod needs bid_per_gpu")
        volume = spec.volume
        if volume is not None:
            if volume.cloud != self.name:
                raise InvalidRequest(f"volume {volume.name!r} is a {volume.cloud} volume, not a RunPod network volume")
            _check_text(volume.id, "network volume id")
            _check_text(volume.region, "network volume data center")
            if spec.region not in (None, "", ANY_REGION, volume.region):
                raise InvalidRequest(
                    f"network volume {volume.name!r} is in data center {volume.region}: a pod can only attach it "
                    f"there, not in {spec.region}"
                )
        return spec

    def _launch_once(self, spec: LaunchSpec) -> str:
        env = {**spec.env, "PUBLIC_KEY": spec.ssh_public_key.strip()}
        region = spec.region if spec.region not in (None, "", ANY_REGION) else None
        volume = spec.volume
        if volume is not None:
            region = volume.region  # the pod lands where its volume is
        if not spec.spot:
            attach = {"network_volume_id": volume.id, "volume_mount_path": VOLUME_MOUNT_PATH} if volume else {}
            pod = self._once(
                create_pod,
                name=spec.name,
                image_name=spec.image or DEFAULT_IMAGE,
                gpu_type_id=spec.instance_type,
                cloud_type=self.cloud_type,
                gpu_count=spec.gpu_count,
                container_disk_in_gb=spec.disk_gb or 50,
                ports="22/tcp",
                env=env,
                data_center_id=region,
                support_public_ip=True,
                start_ssh=True,
                allowed_cuda_versions=list(CUDA_VERSIONS),
                **attach,
            )
            return pod["id"]
        # The SDK (1.12) has no spot call: the same input through its GraphQL transport.
        env_items = ", ".join(f'{{ key: "{k}", value: "{v}" }}' for k, v in env.items())
        dc = f'"{region}"' if region else "null"
        cuda = ", ".join(f'"{v}"' for v in CUDA_VERSIONS)
        attach = f'networkVolumeId: "{volume.id}", volumeMountPath: "{VOLUME_MOUNT_PATH}", ' if volume else ""
        doc = (
            f'mutation {{ podRentInterruptable(input: {{ bidPerGpu: {float(spec.bid_per_gpu)}, name: "{spec.name}", '
            f'imageName: "{spec.image or DEFAULT_IMAGE}", cloudType: {self.cloud_type}, startSsh: true, '
            f'gpuTypeId: "{spec.instance_type}", supportPublicIp: true, gpuCount: {int(spec.gpu_count)}, '
            f'containerDiskInGb: {int(spec.disk_gb or 50)}, ports: "22/tcp", dataCenterId: {dc}, '
            f"{attach}allowedCudaVersions: [{cuda}], env: [{env_items}] }}) "
            "{ id } }"
        )
        return self._once(run_graphql_query, doc)["data"]["podRentInterruptable"]["id"]

    def _terminate_once(self, instance_id: str) -> None:
        _check_text(instance_id, "pod id")
        self._once(terminate_pod, instance_id)

    # --- network volumes (volumes) ----------------------------------------------------------

    @property
    def rest_base(self) -> str:
        return (self._rest_base or os.environ.get(REST_BASE_ENV) or DEFAULT_REST_BASE).rstrip("/")

    def _rest_once(self, method: str, path: str, body: dict | None = None):
        """One REST v1 call (Bearer auth, as SkyPilot's sky/provision/runpod/volume.py calls it): the
        decoded body, None for an empty one, or an error. Its error bodies are {"error": ...} in
        recordings and {"message": ...} in the docs (research/cloud-apis.md §2b): both are read."""
        url = self.rest_base + path
        try:
            resp = self._http.request(
                method, url, json=body, timeout=self.timeout, headers={"Authorization": f"Bearer {self._key}"}
            )
        except (requests.ConnectionError, requests.Timeout) as e:
            raise unreachable(f"RunPod REST API {method} {path}", e) from None
        try:
            payload = resp.json() if resp.content else None
        except ValueError:
            payload = None
        if resp.ok:
            if resp.content and payload is None:
                raise CloudError(f"RunPod REST API {method} {path} answered something that is not JSON", retryable=True)
            return payload
        message = ""
        if isinstance(payload, dict):
            message = str(payload.get("error") or payload.get("message") or "")
        text = f"RunPod REST API {method} {path}: {resp.status_code}: {message or resp.reason}"
        if resp.status_code in (401, 403):
            raise AuthError(text + ". Check RUNPOD_API_KEY.")
        if resp.status_code == 429:
            raise RateLimited(text)
        if resp.status_code >= 500:
            raise CloudError(text, retryable=True)
        if resp.status_code == 404:
            raise NotFound(text)
        if resp.status_code == 400 and ("in use" in message.lower() or "attached" in message.lower()):
            raise VolumeInUse(text)
        if resp.status_code in (400, 422):
            raise InvalidRequest(text)
        raise CloudError(text)

    def _rest(self, method: str, path: str, body: dict | None = None):
        return with_retries(lambda: self._rest_once(method, path, body), self.retry, f"RunPod {method} {path}")

    def _volume(self, d: dict, attached: set[str]) -> Volume:
        return Volume(
            id=d["id"],
            name=d.get("name") or "",
            cloud=self.name,
            region=d.get("dataCenterId") or "",
            size_gb=int(d["size"]) if d.get("size") is not None else None,
            bytes_used=None,  # RunPod does not report it
            in_use=d["id"] in attached,
            mount_point=VOLUME_MOUNT_PATH,
        )

    def _attached(self) -> set[str]:
        """The network volumes that a pod of the account has (as SkyPilot reads it: myself.pods)."""
        pods = self._query("query myPods { myself { pods { id networkVolumeId } } }")["myself"]["pods"] or []
        return {p["networkVolumeId"] for p in pods if p.get("networkVolumeId")}

    def volumes(self) -> list[Volume]:
        listed = self._rest("GET", "/networkvolumes") or []
        attached = self._attached() if listed else set()
        return [self._volume(d, attached) for d in listed]

    def _check_volume(self, name: str, region: str, size_gb: int | None) -> None:
        validate_name(name, "network volume name")  # NAME_RE: no quotes, nothing the GraphQL inlining breaks on
        if not isinstance(region, str) or not re.match(r"^[A-Z0-9][A-Z0-9-]*$", region):
            raise InvalidRequest(f"invalid RunPod data center {region!r}: an id such as EU-RO-1")
        if not isinstance(size_gb, int) or isinstance(size_gb, bool) or not VOLUME_MIN_GB <= size_gb <= VOLUME_MAX_GB:
            raise InvalidRequest(
                f"invalid network volume size {size_gb!r}: a whole number of GB from {VOLUME_MIN_GB} to {VOLUME_MAX_GB}"
            )

    def _create_volume_once(self, name: str, region: str, size_gb: int | None) -> Volume:
        d = self._rest_once("POST", "/networkvolumes", {"name": name, "size": size_gb, "dataCenterId": region})
        if not isinstance(d, dict) or not d.get("id"):
            raise CloudError("RunPod answered a network volume creation without the volume", retryable=True)
        return self._volume(d, set())

    def _delete_volume_once(self, volume_id: str) -> None:
        """Refuses a volume a pod has before asking: what RunPod answers to deleting an attached
        volume is not documented, so the client does not depend on it."""
        if not re.match(r"^[0-9A-Za-z_-]+$", volume_id or ""):
            raise InvalidRequest(f"invalid RunPod network volume id {volume_id!r}")
        listed = {v.id: v for v in self.volumes()}
        volume = listed.get(volume_id)
        if volume is None:
            raise NotFound(f"RunPod network volume {volume_id} does not exist")
        if volume.in_use:
            raise VolumeInUse(f"RunPod network volume {volume.name} ({volume_id}) is attached to a pod: terminate it first")
        self._rest_once("DELETE", f"/networkvolumes/{volume_id}")
