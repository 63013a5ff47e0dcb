"""RunPod over the official `runpod` SDK (GraphQL; research/cloud-apis.md §2).

Quirks kept here: the SDK takes its key from a module global (we set it from our config on every
call and never let it come from ~/.runpod), reads RUNPOD_API_BASE_URL on every call, hides HTTP
statuses behind QueryError messages, and inlines strings into GraphQL without escaping them, so
names and environment values with quotes, backslashes or newlines are refused before any call.
A pod reads RUNNING with `runtime: null` until its container is up; it is ready when
`runtime.ports` has the public TCP entry for private port 22.
"""

from __future__ import annotations

import os
import re
import threading

import requests
import runpod
from runpod.api.graphql import run_graphql_query

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
    validate_name,
    with_retries,
)

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

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        cloud_type: str = "SECURE",
        retry: RetryPolicy | None = None,
        poll_interval: float = 2.0,
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

    # --- transport -------------------------------------------------------------------------

    def _once(self, fn, *args, **kwargs):
        with _sdk_lock:
            runpod.api_key = self._key  # ours, never what the SDK loaded from ~/.runpod
            try:
                return fn(*args, **kwargs)
            except runpod.error.AuthenticationError as e:
                raise AuthError(f"RunPod: {e}. Check RUNPOD_API_KEY.") from None
            except runpod.error.QueryError as e:
                raise _classify(str(e)) from None
            except (requests.ConnectionError, requests.Timeout) as e:
                raise CloudError(f"RunPod API: {type(e).__name__}", retryable=True) from None
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
        return spec

    def _launch_once(self, spec: LaunchSpec) -> str:
        env = {**spec.env, "PUBLIC_KEY": spec.ssh_public_key.strip()}
        region = spec.region if spec.region not in (None, "", ANY_REGION) else None
        if not spec.spot:
            pod = self._once(
                runpod.create_pod,
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
            )
            return pod["id"]
        # The SDK (1.12) has no spot call: the same input through its GraphQL transport.
        env_items = ", ".join(f'{{ key: "{k}", value: "{v}" }}' for k, v in env.items())
        dc = f'"{region}"' if region else "null"
        cuda = ", ".join(f'"{v}"' for v in CUDA_VERSIONS)
        doc = (
            f'mutation {{ podRentInterruptable(input: {{ bidPerGpu: {float(spec.bid_per_gpu)}, name: "{spec.name}", '
            f'imageName: "{spec.image or DEFAULT_IMAGE}", cloudType: {self.cloud_type}, startSsh: true, '
            f'gpuTypeId: "{spec.instance_type}", supportPublicIp: true, gpuCount: {int(spec.gpu_count)}, '
            f'containerDiskInGb: {int(spec.disk_gb or 50)}, ports: "22/tcp", dataCenterId: {dc}, '
            f"allowedCudaVersions: [{cuda}], env: [{env_items}] }}) "
            "{ id } }"
        )
        return self._once(run_graphql_query, doc)["data"]["podRentInterruptable"]["id"]

    def _terminate_once(self, instance_id: str) -> None:
        _check_text(instance_id, "pod id")
        self._once(runpod.terminate_pod, instance_id)
