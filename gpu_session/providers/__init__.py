"""Pulumi dynamic providers over gpu_session.clouds.

These modules are pickled by reference into every stack's state (`__provider`): never rename or
move them, or `pulumi destroy` of existing stacks breaks (../shared/research/pulumi.md §1.2).
Credentials come from the stack config in configure() or from the environment, read inside each
method: never inputs, never attributes set in __init__ (which would be pickled). Imports clouds,
sizing, paths and errors only.
"""

from .configure import Configure, ConfigureProvider
from .instance import GpuInstance, GpuInstanceProvider
from .ssh_key import LambdaSshKey, LambdaSshKeyProvider
from .volume import CacheVolume, CacheVolumeProvider

__all__ = [
    "CacheVolume",
    "CacheVolumeProvider",
    "Configure",
    "ConfigureProvider",
    "GpuInstance",
    "GpuInstanceProvider",
    "LambdaSshKey",
    "LambdaSshKeyProvider",
]
