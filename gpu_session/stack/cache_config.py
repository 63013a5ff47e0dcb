"""A cache stack's configuration (project gpu-session-cache, infra/cache/): which cloud, which
region, and on RunPod the volume's size (on Lambda, where a filesystem has no size, a soft cap
that only this config holds), checked before anything is created; every bad key is named with what
to do. Keys take the `gpu-session:` namespace (what `gpu-session cache create` sets) or the
project's own, `gpu-session-cache:` (what a bare `pulumi config set` in infra/cache/ writes)."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, fields

from gpu_session.clouds import CLOUDS

from .config import NAMESPACE, SECRETS, ConfigError, _choice, _text
from .names import CACHE_PROJECT, REGION

# RunPod's network volume sizes, whole GB (clouds.runpod.VOLUME_MIN_GB/MAX_GB: the console's range).
MIN_GB, MAX_GB = 10, 4000
DEFAULT_RUNPOD_GB = 50  # a RunPod volume needs a size: an engine's venv (~7 GB) and a 7-8B model's weights (~15 GB), twice


@dataclass(frozen=True)
class CacheConfig:
    cloud: str
    region: str
    sizeGb: int | None = None  # noqa: N815 (RunPod: the volume's size; Lambda: a soft cap, None: none)
    lambdaApiKey: str | None = None  # noqa: N815
    runpodApiKey: str | None = None  # noqa: N815

    def __repr__(self) -> str:  # never print a secret by accident
        shown = {
            f.name: "(secret)" if f.name in SECRETS and getattr(self, f.name) else getattr(self, f.name) for f in fields(self)
        }
        return f"CacheConfig({shown})"


KEYS = [f.name for f in fields(CacheConfig)]


def _region(text: str) -> str:
    if not REGION.match(text):
        raise ValueError("a region as the cloud names it: a Lambda region like us-east-1, a RunPod data center like EU-RO-1")
    return text


def _size(text: str) -> int:
    if not re.fullmatch(r"\d+", text) or not MIN_GB <= int(text) <= MAX_GB:
        raise ValueError(f"a whole number of GB from {MIN_GB} to {MAX_GB}")
    return int(text)


PARSERS = {
    "cloud": _choice(*CLOUDS),
    "region": _region,
    "sizeGb": _size,
    "lambdaApiKey": _text,
    "runpodApiKey": _text,
}


def parse(values: dict[str, object]) -> CacheConfig:
    """Keys with or without a namespace (ours or the cache project's); values as Pulumi gives them
    (strings) or as Python values. ConfigError naming every bad key at once."""
    problems, parsed = [], {}
    for raw_key, value in values.items():
        namespace, _, key = raw_key.rpartition(":")
        if namespace and namespace not in (NAMESPACE, CACHE_PROJECT):
            continue  # another package's config: not ours to judge
        if key not in PARSERS:
            near = difflib.get_close_matches(key, KEYS, n=1)
            problems.append(
                f"{NAMESPACE}:{key} is not a cache setting" + (f"; did you mean {NAMESPACE}:{near[0]}?" if near else "")
            )
            continue
        text = str(value)
        try:
            parsed[key] = PARSERS[key](text)
        except ValueError as e:
            shown = "(secret)" if key in SECRETS else repr(text)
            problems.append(f"{NAMESPACE}:{key} must be {e} (got {shown})")
    for key in ("cloud", "region"):
        if key not in parsed and not any(p.startswith(f"{NAMESPACE}:{key} ") for p in problems):
            problems.append(f"{NAMESPACE}:{key} is required: pulumi config set {NAMESPACE}:{key} <{key}>")
    if parsed.get("cloud") == "runpod" and "sizeGb" not in parsed and not any(" sizeGb " in f" {p} " for p in problems):
        parsed["sizeGb"] = DEFAULT_RUNPOD_GB
    if problems:
        raise ConfigError("; ".join(problems))
    return CacheConfig(**parsed)


def from_pulumi() -> CacheConfig:
    """The running cache program's stack config (secrets decrypted)."""
    from pulumi.runtime import config as runtime_config

    values = {**runtime_config.get_config_env(), **runtime_config.CONFIG.get()}
    return parse({k: v for k, v in values.items() if k.startswith((f"{NAMESPACE}:", f"{CACHE_PROJECT}:"))})
