"""The user's config: ~/.config/gpu-session/config.yaml (0600), written by `invoke setup`.

It holds the API keys and the defaults of `up` (model, cloud, gpu, hours, budget). The environment
wins over it: a key exported in the shell is used as it is, and the file only fills what is missing.
Keys are checked against their API before they are saved, and never taken as command arguments.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from gpu_session.errors import GpuSessionError
from gpu_session.paths import config_dir, write_private

KEYS = {"lambda_api_key": "LAMBDA_API_KEY", "runpod_api_key": "RUNPOD_API_KEY", "hf_token": "HF_TOKEN"}
DEFAULTS = {"model": str, "cloud": str, "gpu": str, "hours": float, "budget": float}


class ConfigFileError(GpuSessionError, ValueError):
    pass


def path() -> Path:
    return config_dir() / "config.yaml"


def load() -> dict:
    """The file's settings ({} when there is none). Refuses a file others can read, or a wrong value."""
    p = path()
    if not p.exists():
        return {}
    if p.stat().st_mode & 0o077:
        raise ConfigFileError(f"{p} can be read by others: chmod 600 {p}")
    data = yaml.safe_load(p.read_text()) or {}
    unknown = set(data) - set(KEYS) - set(DEFAULTS)
    if unknown:
        raise ConfigFileError(f"{p}: unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join([*KEYS, *DEFAULTS])}")
    for key, kind in DEFAULTS.items():
        if key in data and not isinstance(data[key], kind | int if kind is float else kind):
            raise ConfigFileError(f"{p}: {key} must be a {kind.__name__} (got {data[key]!r})")
    return data


def apply_keys(data: dict) -> None:
    """The file's keys into this process's environment, where the environment has none."""
    for key, var in KEYS.items():
        if data.get(key) and not os.environ.get(var):
            os.environ[var] = data[key]


def check_key(key: str, value: str) -> str:
    """Ask the key's API whether it works: what it said, or raise ConfigFileError."""
    if key == "hf_token":
        from huggingface_hub.errors import HfHubHTTPError

        from gpu_session.sizing import hub

        try:
            return f"Hugging Face: {hub().whoami(token=value)['name']}"
        except (HfHubHTTPError, OSError) as e:
            raise ConfigFileError(f"the Hugging Face token was refused: {e}") from None
    from gpu_session.clouds import AuthError, CloudError, get_cloud

    cloud = key.removesuffix("_api_key")
    try:
        return f"{cloud}: {len(get_cloud(cloud, api_key=value).offers())} offers"
    except AuthError as e:
        raise ConfigFileError(f"the {cloud} key was refused: {e}") from None
    except CloudError as e:  # no answer, or not one about the key: nothing is saved unchecked
        raise ConfigFileError(f"the {cloud} key could not be checked: {e}") from None


def save(data: dict) -> Path:
    return write_private(path(), yaml.safe_dump({k: v for k, v in data.items() if v not in (None, "")}, sort_keys=False))
