"""A stack's configuration (the `gpu-session:*` keys of Pulumi.<stack>.yaml), checked before
anything is launched: every bad key is named with what to do, and unknown keys are refused with
the nearest known one. Pulumi.example.yaml documents the same keys; a test keeps the two in step.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, fields

from gpu_session.clouds import CLOUDS
from gpu_session.errors import GpuSessionError
from gpu_session.sizing import HUB_ID

NAMESPACE = "gpu-session"


class ConfigError(GpuSessionError, ValueError):
    """One or more keys are wrong; the message names each and says what to do."""


@dataclass(frozen=True)
class StackConfig:
    model: str
    cloud: str = "lambda"
    gpu: str = "auto"
    gpuCount: int = 1  # noqa: N815 (the config key's own spelling)
    region: str = "auto"
    hours: float = 2.0
    maxPricePerHour: float | None = None  # noqa: N815
    diskGb: int | None = None  # noqa: N815 (None: sized from the weights, gpu_session.fit.disk_gib)
    # Tokens of context the GPU must hold at least; None: the model's own, at most 8,192. The host
    # serves the most its KV cache holds, capped at the model's own (vLLM's --max-model-len).
    context: int | None = None
    trustRemoteCode: bool = False  # noqa: N815 (load code from the model's repo: config.json's auto_map)
    # The cache volume to attach (its id at the cloud: `gpu-session cache list`); None: no cache. The
    # instance is launched in the volume's region.
    cacheVolume: str | None = None  # noqa: N815
    cacheGated: bool = False  # noqa: N815 (a gated or private model's weights may go on the cache volume too)
    # The weights may go on the cache volume (false: the engine alone; `up` sets it where the volume cannot hold them).
    cacheWeights: bool = True  # noqa: N815
    quantize: bool = False
    backend: str = "auto"
    image: str | None = None  # RunPod only; None: the client's default (clouds.runpod.DEFAULT_IMAGE)
    configure: bool = True
    # Where the model server runs: cuda, or cpu on a host without a GPU (the simulator's hosts;
    # GPU_SESSION_DEVICE, which the simulator's --env sets, is the default).
    device: str = "cuda"
    # Secrets: from the stack's secret config, or the environment (LAMBDA_API_KEY, RUNPOD_API_KEY, HF_TOKEN).
    hfToken: str | None = None  # noqa: N815
    lambdaApiKey: str | None = None  # noqa: N815
    runpodApiKey: str | None = None  # noqa: N815

    def __repr__(self) -> str:  # never print a secret by accident
        shown = {
            f.name: ("(secret)" if f.name in SECRETS and getattr(self, f.name) else getattr(self, f.name)) for f in fields(self)
        }
        return f"StackConfig({shown})"


SECRETS = {"hfToken", "lambdaApiKey", "runpodApiKey"}
KEYS = [f.name for f in fields(StackConfig)]


def _bool(text: str) -> bool:
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise ValueError("true or false")


def _whole(low: int):
    def parse(text: str) -> int:
        if not re.fullmatch(r"\d+", text) or int(text) < low:
            raise ValueError(f"a whole number of at least {low}")
        return int(text)

    return parse


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError("a number above 0")
    return value


def _choice(*options: str):
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(" or ".join(options))
        return text

    return parse


def _hub_id(text: str) -> str:
    if not HUB_ID.match(text):
        raise ValueError("a Hugging Face model id like meta-llama/Llama-3.1-8B-Instruct")
    return text


def _text(text: str) -> str:
    if not text or any(c in text for c in "\n\r\0"):
        raise ValueError("a non-empty single line")
    return text


PARSERS = {
    "model": _hub_id,
    "cloud": _choice(*CLOUDS),
    "gpu": _text,
    "gpuCount": _whole(1),
    "region": _text,
    "hours": _positive,
    "maxPricePerHour": _positive,
    "diskGb": _whole(10),
    "context": _whole(1),
    "trustRemoteCode": _bool,
    "cacheVolume": _text,
    "cacheGated": _bool,
    "cacheWeights": _bool,
    "quantize": _bool,
    "backend": _choice("auto", "vllm", "transformers"),
    "image": _text,
    "configure": _bool,
    "device": _choice("cuda", "cpu"),
    "hfToken": _text,
    "lambdaApiKey": _text,
    "runpodApiKey": _text,
}


def parse(values: dict[str, object]) -> StackConfig:
    """Keys with or without the `gpu-session:` namespace; values as Pulumi gives them (strings) or
    as Python values. Raises ConfigError naming every bad key at once."""
    problems, parsed = [], {}
    for raw_key, value in values.items():
        namespace, _, key = raw_key.rpartition(":")
        if namespace and namespace != NAMESPACE:
            continue  # another package's config (aws:region, ...): not ours to judge
        if key not in PARSERS:
            near = difflib.get_close_matches(key, KEYS, n=1)
            problems.append(f"{NAMESPACE}:{key} is not a setting" + (f"; did you mean {NAMESPACE}:{near[0]}?" if near else ""))
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        try:
            parsed[key] = PARSERS[key](text)
        except ValueError as e:
            shown = "(secret)" if key in SECRETS else repr(text)
            problems.append(f"{NAMESPACE}:{key} must be {e} (got {shown})")
    if "model" not in parsed and not any(p.startswith(f"{NAMESPACE}:model ") for p in problems):
        problems.append(f"{NAMESPACE}:model is required: pulumi config set model <owner/name>")
    if problems:
        raise ConfigError("; ".join(problems))
    return StackConfig(**parsed)


def default_device() -> str:
    """The model server's device when the stack's config names none: GPU_SESSION_DEVICE, else cuda."""
    return os.environ.get("GPU_SESSION_DEVICE") or StackConfig.device


def from_pulumi() -> StackConfig:
    """The running program's stack config (what `pulumi config` holds, secrets decrypted)."""
    from pulumi.runtime import config as runtime_config

    values = {f"{NAMESPACE}:device": default_device(), **runtime_config.get_config_env(), **runtime_config.CONFIG.get()}
    return parse({k: v for k, v in values.items() if k.startswith(f"{NAMESPACE}:")})
