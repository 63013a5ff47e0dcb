"""One module per cloud behind one small interface (base.Cloud). Nothing above this package
branches on the cloud's name: what differs is an attribute of the Cloud class (cloud_class).
Imports errors only."""

from __future__ import annotations

from .base import (
    ANY_REGION,
    AuthError,
    CapacityError,
    Cloud,
    CloudError,
    Instance,
    InvalidRequest,
    LaunchSpec,
    NoSimulator,
    NotFound,
    NotReady,
    Offer,
    RateLimited,
    RetryPolicy,
    SshEndpoint,
    SshKeyInfo,
    Status,
    Volume,
    VolumeInUse,
)

CLOUDS = ("lambda", "runpod")
# Where each cloud's API key is looked for: the environment, and the stack's secret config.
API_KEY_ENV = {"lambda": "LAMBDA_API_KEY", "runpod": "RUNPOD_API_KEY"}
API_KEY_CONFIG = {"lambda": "lambdaApiKey", "runpod": "runpodApiKey"}
# Where each client sends its calls when not to the cloud's own API (the simulator's address).
API_BASE_ENV = {"lambda": "LAMBDA_API_BASE", "runpod": "RUNPOD_API_BASE_URL"}
# Every address setting of each client: API_BASE_ENV's, and RunPod's REST API (its network volumes),
# which lives at another address than its GraphQL API (runpod.REST_BASE_ENV).
API_BASE_ENVS = {"lambda": ("LAMBDA_API_BASE",), "runpod": ("RUNPOD_API_BASE_URL", "RUNPOD_REST_API_BASE_URL")}

__all__ = [
    "ANY_REGION",
    "API_BASE_ENV",
    "API_BASE_ENVS",
    "API_KEY_CONFIG",
    "API_KEY_ENV",
    "CLOUDS",
    "AuthError",
    "CapacityError",
    "Cloud",
    "CloudError",
    "Instance",
    "InvalidRequest",
    "LaunchSpec",
    "NoSimulator",
    "NotFound",
    "NotReady",
    "Offer",
    "RateLimited",
    "RetryPolicy",
    "SshEndpoint",
    "SshKeyInfo",
    "Status",
    "Volume",
    "VolumeInUse",
    "cloud_class",
    "get_cloud",
]


def cloud_class(name: str) -> type[Cloud]:
    """The class for `name` ("lambda" or "runpod"): its attributes say how the cloud differs
    (Cloud.registers_ssh_keys, takes_host_key, host_ends_itself) without a client or a key.
    InvalidRequest for another name."""
    if name == "lambda":
        from .lambda_cloud import LambdaCloud

        return LambdaCloud
    if name == "runpod":
        from .runpod import RunpodCloud

        return RunpodCloud
    raise InvalidRequest(f"unknown cloud {name!r}: choose one of {', '.join(CLOUDS)}")


def get_cloud(name: str, **options) -> Cloud:
    """The client for `name` ("lambda" or "runpod"); options go to its constructor."""
    return cloud_class(name)(**options)
