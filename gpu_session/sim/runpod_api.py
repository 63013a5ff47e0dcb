"""RunPod GraphQL (research/cloud-apis.md §2a), parsed and executed by graphql-core, and the
part of its REST API v1 that the SDK lacks: network volumes (/v1/networkvolumes, §2b).

Business errors come back as HTTP 200 with `errors[]` carrying `path`; a bad key is HTTP 401;
a document that does not parse or validate is HTTP 400. Pods are RUNNING with `runtime: null`
until their host is up.
"""

from __future__ import annotations

import re
import time

from graphql import GraphQLError, build_schema, execute_sync, parse, validate
from graphql.error import GraphQLSyntaxError

from . import catalog
from .faults import with_faults
from .hosts import Hosts
from .http import Request, Response, Router, json_response
from .world import SimInstance, SimVolume, World

SDL = """
scalar Void
enum CloudTypeEnum { ALL SECURE COMMUNITY }
enum PodStatus { CREATED RUNNING RESTARTING EXITED PAUSED DEAD TERMINATED }
enum PodType { INTERRUPTABLE RESERVED }

type LowestPrice {
  minimumBidPrice: Float
  uninterruptablePrice: Float
  minVcpu: Float
  minMemory: Float
  stockStatus: String
  maxUnreservedGpuCount: Int
  availableGpuCounts: [Int]
}
input GpuLowestPriceInput {
  gpuCount: Int
  minDisk: Int
  minMemoryInGb: Int
  minVcpuCount: Int
  secureCloud: Boolean
  supportPublicIp: Boolean
  dataCenterId: String
  countryCode: String
}
type GpuType {
  id: String
  displayName: String
  manufacturer: String
  memoryInGb: Int
  cudaCores: Int
  secureCloud: Boolean
  communityCloud: Boolean
  securePrice: Float
  communityPrice: Float
  oneMonthPrice: Float
  threeMonthPrice: Float
  oneWeekPrice: Float
  communitySpotPrice: Float
  secureSpotPrice: Float
  maxGpuCount: Int
  lowestPrice(input: GpuLowestPriceInput): LowestPrice
}
input GpuTypeFilter { id: String }

type PodRuntimePorts { ip: String isIpPublic: Boolean privatePort: Int publicPort: Int type: String }
type PodRuntime { uptimeInSeconds: Int ports: [PodRuntimePorts] }
type PodMachineInfo { gpuDisplayName: String podHostId: String dataCenterId: String location: String }
type Pod {
  id: String!
  name: String
  containerDiskInGb: Int
  costPerHr: Float
  desiredStatus: PodStatus
  dockerArgs: String
  dockerId: String
  env: [String]
  gpuCount: Int
  imageName: String
  lastStatusChange: String
  machineId: String
  memoryInGb: Float
  podType: PodType
  port: Int
  ports: String
  uptimeSeconds: Int
  vcpuCount: Float
  volumeInGb: Float
  volumeMountPath: String
  runtime: PodRuntime
  machine: PodMachineInfo
  networkVolumeId: String
}
type NetworkVolume { id: String name: String size: Int dataCenterId: String }
type User { id: String pubKey: String pods: [Pod] networkVolumes: [NetworkVolume] }
input PodFilter { podId: String! }
input EnvironmentVariableInput { key: String! value: String! }
input PodFindAndDeployOnDemandInput {
  name: String
  imageName: String
  cloudType: CloudTypeEnum
  startSsh: Boolean
  startJupyter: Boolean
  gpuTypeId: String
  gpuTypeIdList: [String]
  supportPublicIp: Boolean
  gpuCount: Int
  volumeInGb: Int
  minVcpuCount: Int
  minMemoryInGb: Int
  dataCenterId: String
  countryCode: String
  dockerArgs: String
  containerDiskInGb: Int
  ports: String
  volumeMountPath: String
  env: [EnvironmentVariableInput]
  templateId: String
  networkVolumeId: String
  allowedCudaVersions: [String]
  minDownload: Int
  minUpload: Int
  instanceId: String
}
input PodRentInterruptableInput {
  bidPerGpu: Float!
  name: String
  imageName: String
  cloudType: CloudTypeEnum
  startSsh: Boolean
  gpuTypeId: String
  supportPublicIp: Boolean
  gpuCount: Int
  volumeInGb: Int
  minVcpuCount: Int
  minMemoryInGb: Int
  dataCenterId: String
  countryCode: String
  dockerArgs: String
  containerDiskInGb: Int
  ports: String
  volumeMountPath: String
  env: [EnvironmentVariableInput]
  templateId: String
  networkVolumeId: String
  allowedCudaVersions: [String]
}
input PodStopInput { podId: String! incrementVersion: Boolean }
input PodResumeInput { podId: String! gpuCount: Int }
input PodTerminateInput { podId: String! }
input UserSettingsInput { pubKey: String }

type Query {
  gpuTypes(input: GpuTypeFilter): [GpuType]
  pod(input: PodFilter!): Pod
  myself: User
}
type Mutation {
  podFindAndDeployOnDemand(input: PodFindAndDeployOnDemandInput): Pod
  podRentInterruptable(input: PodRentInterruptableInput!): Pod
  podStop(input: PodStopInput!): Pod
  podResume(input: PodResumeInput!): Pod
  podTerminate(input: PodTerminateInput!): Void
  updateUserSettings(input: UserSettingsInput): User
}
"""

NO_CAPACITY = "There are no longer any instances available with the requested specifications. Please refresh and try again."
SOMETHING_WRONG = "Something went wrong. Please try again later or contact support."
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PORTS_RE = re.compile(r"^\d{1,5}/(tcp|http)$")

SCHEMA = build_schema(SDL)  # podTerminate's Void resolves to null, as RunPod answers


def _errors(message: str, code: str, status: int = 200) -> Response:
    return json_response({"errors": [{"message": message, "extensions": {"code": code}}]}, status)


def status_error(status: int) -> Response:
    if status == 429:
        return _errors("Too many requests. Please slow down and try again later.", "TOO_MANY_REQUESTS", 429)
    if status == 500:
        return _errors(SOMETHING_WRONG, "INTERNAL_SERVER_ERROR", 500)
    # Gateways in front of the API answer 502/503 with HTML, which the SDK cannot parse.
    return Response(status, f"<html><body><h1>{status} Bad Gateway</h1></body></html>".encode(), {"Content-Type": "text/html"})


def error_after_create() -> Response:
    """A 5xx whose GraphQL error carries a message no client has a rule for: what a backend's own
    failure looks like once the work is done (this wording is ours, deliberately unfamiliar; Go's
    context timeout, not a quote of RunPod)."""
    return _errors("failed to attach pod to machine: context deadline exceeded", "INTERNAL_SERVER_ERROR", 500)


def capacity_error() -> Response:
    return _errors(NO_CAPACITY, "BAD_USER_INPUT")


def volume_json(vol: SimVolume) -> dict:
    """A network volume as both APIs show it (REST v1 NetworkVolume; GraphQL myself.networkVolumes)."""
    return {"id": vol.id, "name": vol.name, "size": vol.size_gb, "dataCenterId": vol.region}


def stock_status(free: int) -> str | None:
    return None if free <= 0 else "Low" if free == 1 else "Medium" if free == 2 else "High"


class Api:
    """Resolvers over the world. The caller's key travels in the execution context."""

    def __init__(self, world: World):
        self.world = world

    # --- shapes ----------------------------------------------------------------------------

    def gpu_json(self, g: catalog.RunpodGpu) -> dict:
        def lowest_price(info, input=None):
            count = (input or {}).get("gpuCount") or 1
            dc = (input or {}).get("dataCenterId")
            dcs = [dc] if dc else catalog.RUNPOD_DATA_CENTERS
            free = sum(self.world.free_slots("runpod", g.id, d) for d in dcs)
            return {
                "minimumBidPrice": round(g.community_spot_price * count, 3),
                "uninterruptablePrice": round(g.community_price * count, 3),
                "minVcpu": 2 * count,
                "minMemory": 8 * count,
                "stockStatus": stock_status(free) if count <= g.max_gpu_count else None,
                "maxUnreservedGpuCount": g.max_gpu_count if free else 0,
                "availableGpuCounts": [c for c in (1, 2, 4, 8) if c <= g.max_gpu_count] if free else [],
            }

        return {
            "id": g.id,
            "displayName": g.display_name,
            "manufacturer": "Nvidia",
            "memoryInGb": g.memory_gb,
            "cudaCores": g.cuda_cores,
            "secureCloud": True,
            "communityCloud": True,
            "securePrice": g.secure_price,
            "communityPrice": g.community_price,
            "oneMonthPrice": round(g.secure_price * 0.9, 2),
            "threeMonthPrice": round(g.secure_price * 0.85, 2),
            "oneWeekPrice": round(g.secure_price * 0.95, 2),
            "communitySpotPrice": g.community_spot_price,
            "secureSpotPrice": g.secure_spot_price,
            "maxGpuCount": g.max_gpu_count,
            "lowestPrice": lowest_price,
        }

    def pod_json(self, inst: SimInstance) -> dict:
        g = catalog.runpod_gpu(inst.type_name)
        runtime = None
        if inst.host_up and inst.status == "RUNNING":
            ports = []
            for spec in filter(None, inst.ports.split(",")):
                port, _, kind = spec.partition("/")
                if port == "22" and kind == "tcp":
                    ports.append(
                        {"ip": inst.address, "isIpPublic": True, "privatePort": 22, "publicPort": inst.ssh_port, "type": "tcp"}
                    )
                else:
                    ports.append(
                        {
                            "ip": "100.65.0.2",
                            "isIpPublic": False,
                            "privatePort": int(port),
                            "publicPort": 60000 + int(port) % 5000,
                            "type": kind,
                        }
                    )
            runtime = {"uptimeInSeconds": int(time.time() - (inst.booted_at or time.time())), "ports": ports}
        return {
            "id": inst.id,
            "name": inst.name,
            "containerDiskInGb": inst.disk_gb,
            "costPerHr": inst.price_per_hour,
            "desiredStatus": inst.status,
            "dockerArgs": "",
            "dockerId": None,
            "env": [f"{k}={v}" for k, v in inst.env.items() if not k.startswith("RUNPOD_")],
            "gpuCount": inst.gpu_count,
            "imageName": inst.image,
            "lastStatusChange": time.strftime("Rented by User: %a %b %d %Y", time.gmtime(inst.last_status_change)),
            "machineId": "sim" + inst.id[:9],
            "memoryInGb": 8 * inst.gpu_count,
            "podType": "INTERRUPTABLE" if inst.spot else "RESERVED",
            "port": None,
            "ports": inst.ports,
            "uptimeSeconds": runtime["uptimeInSeconds"] if runtime else 0,
            "vcpuCount": 2 * inst.gpu_count,
            "volumeInGb": 0,
            "volumeMountPath": inst.volume_mount_path,
            "networkVolumeId": inst.volume_ids[0] if inst.volume_ids else None,
            "runtime": runtime,
            "machine": {
                "gpuDisplayName": g.display_name,
                "podHostId": f"{inst.id}-64410065",
                "dataCenterId": inst.region,
                "location": inst.region,
            },
        }

    # --- access ----------------------------------------------------------------------------

    def _pod_for(self, info, pod_id: str, missing: str | None) -> SimInstance | None:
        """The pod, if the caller may act on it (a pod-scoped key reaches its own pod only)."""
        key = info.context["key"]
        inst = self.world.find("runpod", pod_id)
        if key not in self.world.runpod_keys and (inst is None or inst.pod_key != key):
            raise GraphQLError("You are not authorized to perform this action on this pod.", extensions={"code": "FORBIDDEN"})
        if inst is None and missing:
            raise GraphQLError(missing, extensions={"code": "NOT_FOUND"})
        return inst

    @staticmethod
    def _account_only(info) -> None:
        if info.context["key"] not in info.context["account_keys"]:
            raise GraphQLError("This API key is scoped to a single pod.", extensions={"code": "FORBIDDEN"})

    # --- resolvers -------------------------------------------------------------------------

    def gpu_types(self, info, input=None):
        self._account_only(info)
        wanted = (input or {}).get("id")
        return [self.gpu_json(g) for g in catalog.RUNPOD_GPUS if wanted is None or g.id == wanted]

    def pod(self, info, input):
        inst = self._pod_for(info, input["podId"], None)
        return self.pod_json(inst) if inst else None

    def myself(self, info):
        self._account_only(info)
        return {
            "id": "sim-user",
            "pubKey": "\n".join(self.world.runpod_pub_keys),
            "pods": [self.pod_json(i) for i in self.world.listing("runpod")],
            "networkVolumes": [volume_json(v) for v in self.world.volume_listing("runpod")],
        }

    def deploy(self, info, input=None, spot: bool = False):
        self._account_only(info)
        input = input or {}
        gpu_id = input.get("gpuTypeId") or next(iter(input.get("gpuTypeIdList") or []), None)
        if not gpu_id:
            raise GraphQLError("gpuTypeId is required.", extensions={"code": "BAD_USER_INPUT"})
        if not input.get("imageName") and not input.get("templateId"):
            raise GraphQLError("imageName is required when no templateId is given.", extensions={"code": "BAD_USER_INPUT"})
        for item in input.get("env") or []:
            if not ENV_KEY_RE.match(item["key"]):
                raise GraphQLError(f"Invalid environment variable name: {item['key']}", extensions={"code": "BAD_USER_INPUT"})
        ports = (input.get("ports") or "").replace(" ", "")
        if ports and not all(PORTS_RE.match(p) for p in ports.split(",")):
            raise GraphQLError(
                f"Invalid ports: {ports}. Use a comma-separated list like 22/tcp,8888/http.",
                extensions={"code": "BAD_USER_INPUT"},
            )
        g = catalog.runpod_gpu(gpu_id)
        count = input.get("gpuCount") or 1
        if g is None or count > g.max_gpu_count or count < 1:
            raise GraphQLError(NO_CAPACITY, extensions={"code": "BAD_USER_INPUT"})
        cloud = input.get("cloudType") or "ALL"
        per_gpu = g.community_price if cloud == "COMMUNITY" else g.secure_price
        if spot:
            floor = g.community_spot_price if cloud == "COMMUNITY" else g.secure_spot_price
            if input["bidPerGpu"] < floor:
                raise GraphQLError(
                    f"Your bid price is below the minimum bid price of ${floor}/hr per GPU.",
                    extensions={"code": "BAD_USER_INPUT"},
                )
            per_gpu = input["bidPerGpu"]
        driver = catalog.runpod_host_driver(input.get("allowedCudaVersions"))
        if driver is None:  # no host runs an allowed CUDA version
            raise GraphQLError(NO_CAPACITY, extensions={"code": "BAD_USER_INPUT"})
        dcs = [input["dataCenterId"]] if input.get("dataCenterId") else catalog.RUNPOD_DATA_CENTERS
        world = self.world
        volume = None
        mount_path = input.get("volumeMountPath") or "/workspace"
        if input.get("networkVolumeId"):
            volume = world.find_volume("runpod", input["networkVolumeId"])
            if volume is None:  # our wording: RunPod's own for this case is unknown
                raise GraphQLError(f"Network volume {input['networkVolumeId']} not found.", extensions={"code": "BAD_USER_INPUT"})
            if input.get("dataCenterId") and input["dataCenterId"] != volume.region:
                raise GraphQLError(
                    f"Invalid dataCenterId {input['dataCenterId']}: network volume {volume.id} is in {volume.region}.",
                    extensions={"code": "BAD_USER_INPUT"},
                )
            refusal = Hosts.mount_refusal(mount_path, world.hosts.isolated)
            if refusal:
                raise GraphQLError(f"Invalid volumeMountPath (simulator: {refusal}).", extensions={"code": "BAD_USER_INPUT"})
            dcs = [volume.region]  # a pod lands where its network volume is
        with world.lock:
            dc = next((d for d in dcs if d in catalog.RUNPOD_DATA_CENTERS and world.take_slot("runpod", g.id, d)), None)
        if dc is None:
            raise GraphQLError(NO_CAPACITY, extensions={"code": "BAD_USER_INPUT"})
        env = {item["key"]: item["value"] for item in input.get("env") or []}
        if input.get("startSsh") and "PUBLIC_KEY" not in env:
            env["PUBLIC_KEY"] = "\n".join(world.runpod_pub_keys)
        inst = world.new_instance(
            "runpod",
            name=input.get("name") or "",
            type_name=g.id,
            region=dc,
            gpu_count=count,
            price_per_hour=round(per_gpu * count, 3),
            status="RUNNING",
            image=input.get("imageName") or "",
            env=env,
            ports=ports,
            spot=spot,
            disk_gb=input.get("containerDiskInGb") or 10,
            driver=driver,
            volume_ids=[volume.id] if volume else [],
            volume_mount_path=mount_path,
        )
        return self.pod_json(inst)

    def terminate(self, info, input):
        inst = self._pod_for(info, input["podId"], "pod not found to terminate")
        self.world.terminate(inst, by="account-key" if info.context["key"] in self.world.runpod_keys else "pod-key")
        return None

    def stop(self, info, input):
        inst = self._pod_for(info, input["podId"], "pod not found to stop")
        self.world.stop_pod(inst)
        return {"id": inst.id, "desiredStatus": "EXITED"}

    def resume(self, info, input):
        self._account_only(info)
        inst = self._pod_for(info, input["podId"], "pod not found to resume")
        if inst.status == "RUNNING":
            raise GraphQLError("Pod is already running.", extensions={"code": "BAD_USER_INPUT"})
        self.world.restart(inst)
        return self.pod_json(inst)

    def update_user(self, info, input=None):
        self._account_only(info)
        self.world.runpod_pub_keys = [k for k in ((input or {}).get("pubKey") or "").split("\n") if k.strip()]
        return self.myself(info)

    def root(self) -> dict:
        return {
            "gpuTypes": self.gpu_types,
            "pod": self.pod,
            "myself": self.myself,
            "podFindAndDeployOnDemand": self.deploy,
            "podRentInterruptable": lambda info, input: self.deploy(info, input, spot=True),
            "podStop": self.stop,
            "podResume": self.resume,
            "podTerminate": self.terminate,
            "updateUserSettings": self.update_user,
        }


class RestApi:
    """REST v1's network volumes (rest.runpod.io/v1), as SkyPilot's sky/provision/runpod/volume.py
    calls them: Bearer auth with the account's key; a bare JSON body; errors as {"error": "..."} (a
    live recording's shape; the docs say {"message": ...}: research/cloud-apis.md §2b)."""

    def __init__(self, world: World):
        self.world = world

    @staticmethod
    def error(message: str, status: int) -> Response:
        return json_response({"error": message}, status)

    def status_error(self, status: int) -> Response:
        return self.error("Something went wrong.", status) if status != 429 else self.error("Too many requests.", 429)

    def list(self, req: Request) -> Response:
        """GET /v1/networkvolumes"""
        return json_response([volume_json(v) for v in self.world.volume_listing("runpod")])

    def get(self, req: Request) -> Response:
        """GET /v1/networkvolumes/{id}"""
        vol = self.world.find_volume("runpod", req.params["id"])
        return json_response(volume_json(vol)) if vol else self.error("network volume not found", 404)

    def create(self, req: Request) -> Response:
        """POST /v1/networkvolumes {name, size, dataCenterId} -> 200 and the volume. RunPod does not
        require unique names (ids tell volumes apart), and neither does the simulator."""
        body = req.json()
        if not isinstance(body, dict):
            return self.error("request body must be a JSON object", 400)
        name, size, dc = body.get("name"), body.get("size"), body.get("dataCenterId")
        if not isinstance(name, str) or not name.strip() or len(name) > 128:
            return self.error("name: required, at most 128 characters", 400)
        # 10..4000 GB: the console's range (our assumption about the API's own limit).
        if not isinstance(size, int) or isinstance(size, bool) or not 10 <= size <= 4000:
            return self.error("size: a whole number of GB from 10 to 4000", 400)
        if dc not in catalog.RUNPOD_DATA_CENTERS:
            return self.error(f"dataCenterId: unknown data center {dc!r}", 400)
        return json_response(volume_json(self.world.new_volume("runpod", name, dc, size)))

    def delete(self, req: Request) -> Response:
        """DELETE /v1/networkvolumes/{id} -> 204. What RunPod answers for a volume a pod still has is
        not documented, nor seen in any recording we know: this 400 naming the pod is the simulator's."""
        world = self.world
        with world.lock:
            vol = world.find_volume("runpod", req.params["id"])
            if vol is None:
                return self.error("network volume not found", 404)
            users = world.volume_users(vol)
            if users:
                return self.error(f"network volume {vol.id} is in use by pod {', '.join(i.id for i in users)}", 400)
            world.delete_volume(vol)
        return Response(204)


def mount(router: Router, world: World) -> None:
    api = Api(world)
    root = api.root()
    rest = RestApi(world)

    def rest_guard(op: str, handler):
        inner = with_faults(world, "runpod", op, handler, rest.status_error, lambda: rest.error("no capacity", 400))

        def guarded(req: Request) -> Response:
            auth = req.headers.get("authorization", "")
            key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
            if key not in world.runpod_keys:  # pod-scoped keys reach their own pod only
                return rest.error("Unauthorized", 401)
            return inner(req)

        return guarded

    router.add("GET", "/v1/networkvolumes", rest_guard("networkvolumes", rest.list))
    router.add("POST", "/v1/networkvolumes", rest_guard("networkvolumes", rest.create))
    router.add("GET", "/v1/networkvolumes/{id}", rest_guard("networkvolumes/{id}", rest.get))
    router.add("DELETE", "/v1/networkvolumes/{id}", rest_guard("networkvolumes/{id}", rest.delete))

    def handle(req: Request) -> Response:
        auth = req.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else req.query.get("api_key")
        pod_keys = {i.pod_key for i in world.listing("runpod")}
        if not key or (key not in world.runpod_keys and key not in pod_keys):
            return _errors("Unauthorized", "UNAUTHENTICATED", 401)
        body = req.json()
        if req.method == "GET":
            body = {"query": req.query.get("query", "")}
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            return _errors("Must provide query string.", "BAD_REQUEST", 400)
        try:
            doc = parse(body["query"])
        except GraphQLSyntaxError as e:
            return json_response({"errors": [e.formatted]}, 400)
        op = next((d for d in doc.definitions if d.kind == "operation_definition"), None)
        field = op.selection_set.selections[0].name.value if op and op.selection_set.selections else "*"

        invalid = validate(SCHEMA, doc)
        if invalid:
            return json_response({"errors": [e.formatted for e in invalid]}, 400)

        def execute(_req: Request) -> Response:
            result = execute_sync(
                SCHEMA,
                doc,
                root_value=root,
                variable_values=body.get("variables"),
                context_value={"key": key, "account_keys": world.runpod_keys},
            )
            out = {"data": result.data}
            if result.errors:
                out["errors"] = [e.formatted for e in result.errors]
            return json_response(out)

        return with_faults(world, "runpod", field, execute, status_error, capacity_error, error_after_create)(req)

    router.add("POST", "/graphql", handle)
    router.add("GET", "/graphql", handle)
