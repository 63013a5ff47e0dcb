"""One module per cloud behind one small interface (base.Cloud). Nothing above this package
branches on the cloud."""

from __future__ import annotations

from .base import (
    AuthError,
    CapacityError,
    Cloud,
    CloudError,
    Instance,
    InvalidRequest,
    LaunchSpec,
    NotFound,
    NotReady,
    Offer,
    RateLimited,
    RetryPolicy,
    SshEndpoint,
    SshKeyInfo,
    Status,
)

CLOUDS = ("lambda", "runpod")
API_KEY_ENV = {"lambda": "LAMBDA_API_KEY", "runpod": "RUNPOD_API_KEY"}  # where each cloud's key is looked for

__all__ = [
    "API_KEY_ENV",
    "CLOUDS",
    "AuthError",
    "CapacityError",
    "Cloud",
    "CloudError",
    "Instance",
    "InvalidRequest",
    "LaunchSpec",
    "NotFound",
    "NotReady",
    "Offer",
    "RateLimited",
    "RetryPolicy",
    "SshEndpoint",
    "SshKeyInfo",
    "Status",
    "get_cloud",
]


def get_cloud(name: str, **options) -> Cloud:
    """The client for `name` ("lambda" or "runpod"); options go to its constructor."""
    if name == "lambda":
        from .lambda_cloud import LambdaCloud

        return LambdaCloud(**options)
    if name == "runpod":
        from .runpod import RunpodCloud

        return RunpodCloud(**options)
    raise InvalidRequest(f"unknown cloud {name!r}: choose one of {', '.join(CLOUDS)}")
