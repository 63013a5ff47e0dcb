"""The gpu-session stack: config → memory the model needs → SSH key → GPU instance → Configure.

With gpu-session:cacheVolume the instance attaches that cache volume (a stack of the
gpu-session-cache project: infra/cache/) and the roles keep the engine and the weights on it.

`pulumi up` gives a host serving the model on its 127.0.0.1:8000; `pulumi destroy` scrubs the host
(Configure's delete runs first, while the host is alive) and then terminates it. Everything secret
(the session's private key, the model server's key) stays in the stack's folder under the state
dir; the HF token and the Lambda host key enter the state only as Pulumi secrets.
"""

import subprocess
import sys
from datetime import datetime, timedelta

import jinja2
import pulumi

from gpu_session import sizing
from gpu_session.clouds import cloud_class
from gpu_session.host import ssh
from gpu_session.paths import ASSETS
from gpu_session.providers import Configure, GpuInstance, LambdaSshKey
from gpu_session.stack import config as stack_config
from gpu_session.stack import names

try:
    cfg = stack_config.from_pulumi()
    model = sizing.model_info(cfg.model, cfg.hfToken)
    # Everything knowable before launch is checked before launch, for `pulumi up` alone too.
    sizing.preflight(model, context=cfg.context, trust_remote_code=cfg.trustRemoteCode, token=cfg.hfToken)
    disk_gb = model.check_disk(cfg.diskGb, option="gpu-session:diskGb")
except (stack_config.ConfigError, sizing.SizingError) as e:
    raise pulumi.RunError(str(e)) from None

stack = pulumi.get_stack()
keys = ssh.session_keys(stack)
backend = model.backend(cfg.device) if cfg.backend == "auto" else cfg.backend
context = model.default_context(cfg.context)
cloud = cloud_class(cfg.cloud)

if cloud.registers_ssh_keys:  # `down` and `sweep` find what this stack made by its names
    ssh_key = LambdaSshKey("ssh-key", name=names.ssh_key_name(stack, keys.public_key), public_key=keys.public_key)
if cloud.takes_host_key:
    cloud_init = jinja2.Template((ASSETS / "templates" / "cloud-init.yml.j2").read_text()).render(
        host_private_key=keys.host_private_key, host_public_key=keys.host_public_key
    )

instance = GpuInstance(
    "gpu",
    cloud=cfg.cloud,
    name=names.instance_name(stack),
    gpu_type=cfg.gpu,
    gpu_count=cfg.gpuCount,
    region=None if cfg.region == "auto" else cfg.region,
    disk_gb=disk_gb,
    min_vram_gb=model.need_gb(context, cfg.quantize),  # GiB of room (gpu_session.fit.room) for the weights and the context
    max_price_per_hour=cfg.maxPricePerHour,
    volume_id=cfg.cacheVolume,
    image=cfg.image if cloud.runs_container_image else None,
    ssh_key_name=ssh_key.name if cloud.registers_ssh_keys else None,
    user_data=pulumi.Output.secret(cloud_init) if cloud.takes_host_key else None,
    ssh_public_key=None if cloud.registers_ssh_keys else keys.public_key,
    opts=pulumi.ResourceOptions(additional_secret_outputs=["user_data"]),
)
lease_expires_at = instance.launched_at.apply(
    lambda t: (datetime.fromisoformat(t) + timedelta(hours=cfg.hours)).isoformat(timespec="seconds") if t else ""
)

if cfg.configure:
    # What the roles are made of: a change re-runs the playbook (its own digest skips what is unchanged).
    roles_digest = subprocess.run(
        [sys.executable, str(ASSETS / "playbooks/files/inputs-digest.py"), ""], capture_output=True, text=True, check=True
    ).stdout.strip()
    Configure(
        "configure",
        stack=stack,
        cloud=cfg.cloud,
        instance_id=instance.instance_id,
        host=instance.host,
        port=instance.port.apply(lambda p: str(int(p))),  # numbers cross gRPC as floats
        user=instance.user,
        model=cfg.model,
        backend=backend,
        quantize=str(cfg.quantize).lower(),
        device=cfg.device,
        context=str(context),
        trust_remote_code=str(cfg.trustRemoteCode).lower(),
        lease_expires_at=lease_expires_at,
        roles_digest=roles_digest,
        cache_root=instance.cache_path.apply(lambda p: p or ""),
        cache_size_gb=instance.cache_size_gb.apply(lambda n: str(int(n or 0))),
        # A gated or private model's weights stay off a volume that outlives the session unless the
        # user said so; any model's stay off one that holds the engine alone.
        cache_weights=str(cfg.cacheWeights and model.may_cache(cfg.cacheGated)).lower(),
        hf_token=pulumi.Output.secret(cfg.hfToken) if cfg.hfToken else None,
        opts=pulumi.ResourceOptions(depends_on=[instance]),
    )

pulumi.export("cloud", cfg.cloud)
pulumi.export("instance_id", instance.instance_id)
pulumi.export("host", instance.host)
pulumi.export("port", instance.port.apply(int))
pulumi.export("user", instance.user)
pulumi.export("gpu", instance.gpu_name)
pulumi.export("gpu_count", instance.gpu_count.apply(int))
pulumi.export("price_per_hour", instance.price_per_hour)
pulumi.export("model", cfg.model)
pulumi.export("backend", backend)
pulumi.export("served_model_name", cfg.model)  # both backends answer to the model id
pulumi.export("launched_at", instance.launched_at)  # when the machine began to bill
pulumi.export("lease_expires_at", lease_expires_at)
pulumi.export("session_dir", str(keys.dir))
pulumi.export("cache_volume_id", cfg.cacheVolume or "")  # `cache rm` refuses a volume a live session uses
pulumi.export("cache_path", instance.cache_path.apply(lambda p: p or ""))
