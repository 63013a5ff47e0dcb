"""A gpu-session cache stack: one cache volume (a Lambda persistent filesystem or a RunPod network
volume) in one region, kept across sessions for the engines' venvs and the Hub's weights.

`pulumi up` makes it (or adopts the volume of its name already there); `pulumi destroy` deletes it,
and refuses while an instance has it attached. A session stack (../__main__.py, project
gpu-session) only attaches it by id (gpu-session:cacheVolume): its destroy never touches it.
Config: gpu-session:cloud, gpu-session:region, gpu-session:sizeGb (RunPod: the size, default 50;
Lambda: a soft cap), and the cloud's key as a secret (lambdaApiKey / runpodApiKey) or from the
environment.
"""

import pulumi

from gpu_session.providers import CacheVolume
from gpu_session.stack import cache_config, names
from gpu_session.stack.config import ConfigError

try:
    cfg = cache_config.from_pulumi()
except ConfigError as e:
    raise pulumi.RunError(str(e)) from None

volume = CacheVolume(
    "cache",
    cloud=cfg.cloud,
    name=names.volume_name(cfg.region),
    region=cfg.region,
    size_gb=cfg.sizeGb,
)

pulumi.export("cloud", cfg.cloud)
pulumi.export("region", cfg.region)
pulumi.export("volume_id", volume.volume_id)
pulumi.export("volume_name", names.volume_name(cfg.region))
pulumi.export("mount_point", volume.mount_point)
pulumi.export("size_gb", volume.size_gb)  # RunPod: the volume's size; Lambda: the soft cap (None: none)
pulumi.export("created_at", volume.created_at)  # when it began to bill
