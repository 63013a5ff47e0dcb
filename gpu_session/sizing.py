"""Model → memory it needs → the offers that fit, cheapest first.

What a model needs is read from the Hub (the weights' size, gated or not, vision or not) before
anything is launched; the same rule the model_server role checks on the host (weights × 1.2 for
activations and KV cache) decides what fits, so a plan made here is not refused there.
"""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gpu_session.errors import GpuSessionError

from .clouds import Offer

# Weights × this: activations, CUDA graphs and a useful KV cache (the role's model_server_memory_overhead).
MEMORY_OVERHEAD = 1.2
# --quantize: 4-bit weights where a 16-bit checkpoint would be (AWQ/GPTQ/bitsandbytes), plus scales.
QUANTIZED_SHARE = 0.3
WEIGHT_SUFFIXES = (".safetensors", ".bin")
GB = 1024**3


# The Hub's repo ids: owner/name, letters, digits, - _ . (the roles refuse anything else too).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class SizingError(GpuSessionError, ValueError):
    """The model cannot be looked up, or nothing within the limits fits it; the message says what to do."""


@dataclass(frozen=True)
class ModelInfo:
    id: str
    weights_bytes: int
    gated: bool
    vision: bool
    sha: str = ""

    def need_gb(self, quantize: bool = False) -> float:
        share = QUANTIZED_SHARE if quantize else 1.0
        return math.ceil(self.weights_bytes * share * MEMORY_OVERHEAD / GB * 10) / 10  # up, to 0.1 GB

    @property
    def backend(self) -> str:
        """vLLM for text models; transformers serve (every architecture transformers knows) for
        vision models, whose vLLM support varies by architecture and is absent from its CPU build."""
        return "transformers" if self.vision else "vllm"


def hub():
    """A Hub client for HF_ENDPOINT as it is now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)


def catalog() -> dict[str, str]:
    """Alias → Hub id (gpu_session/catalog.yaml)."""
    import yaml

    return yaml.safe_load((Path(__file__).parent / "catalog.yaml").read_text())["models"]


def resolve(name: str) -> str:
    """A Hub id for an alias or an id; anything else is refused with the nearest names."""
    aliases = catalog()
    if name in aliases:
        return aliases[name]
    if HUB_ID.match(name):
        return name
    raise SizingError(f"{name!r} is neither a model id (owner/name) nor a known alias" + suggest(name))


def suggest(name: str) -> str:
    """ "; did you mean …" from the catalog and the Hub's search, or "" when nothing is near."""
    import difflib

    aliases = catalog()
    known = [*aliases, *aliases.values()]
    near = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    try:
        term = name.rsplit("/", 1)[-1]
        near += [m.id for m in hub().list_models(search=term, limit=3) if m.id not in near]
    except Exception:  # noqa: BLE001 (suggestions are a courtesy: a Hub that does not answer just gives fewer)
        pass
    return f"; did you mean {', '.join(near[:5])}?" if near else ""


def model_info(model: str, token: str | None = None) -> ModelInfo:
    """The Hub's description of `model` (HF_ENDPOINT honoured). Raises SizingError."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    token = token or os.environ.get("HF_TOKEN") or None
    try:
        info = hub().model_info(model, files_metadata=True, token=token)
    except RepositoryNotFoundError:
        raise SizingError(f"{model} is not on the Hub, or is private and the HF token cannot see it{suggest(model)}") from None
    except HfHubHTTPError as e:
        raise SizingError(f"the Hub could not describe {model}: {e}") from None
    except Exception as e:  # noqa: BLE001 (connection refused, DNS, timeouts, in whatever class the HTTP library of the day raises)
        raise SizingError(f"the Hub at {os.environ.get('HF_ENDPOINT') or 'huggingface.co'} is unreachable: {e}") from None
    weights = sum(s.size or 0 for s in info.siblings or [] if s.rfilename.endswith(WEIGHT_SUFFIXES))
    tags = set(info.tags or [])
    vision = info.pipeline_tag in ("image-text-to-text", "image-to-text") or "vision" in tags
    return ModelInfo(model, weights, bool(info.gated), vision, info.sha or "")


@contextmanager
def quiet_hub():
    """huggingface_hub's progress bars off for the calls inside (and back as they were after)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_off = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            enable_progress_bars()


def context_length(model: str, token: str | None = None) -> int | None:
    """The longest context the model was trained for (its config.json), or None where it does not say."""
    import json
    import tempfile

    token = token or os.environ.get("HF_TOKEN") or None
    try:
        # A throwaway cache (the simulator's files never mix with the Hub's); a few hundred bytes: no progress bar.
        with tempfile.TemporaryDirectory() as cache, quiet_hub():
            config = json.loads(Path(hub().hf_hub_download(model, "config.json", token=token, cache_dir=cache)).read_text())
    except Exception as e:  # noqa: BLE001 (any Hub failure: the caller goes on without a context length)
        raise SizingError(f"the Hub could not give {model}'s config.json: {e}") from None
    for section in (config, config.get("text_config") or {}):
        if isinstance(section.get("max_position_embeddings"), int):
            return section["max_position_embeddings"]
    return None


def fitting(offers: list[Offer], need_gb: float, *, gpu_count: int | None = None, max_price: float | None = None,
            gpu_type: str | None = None, with_capacity: bool = True) -> list[Offer]:  # fmt: skip
    """Offers whose total GPU memory holds `need_gb`, cheapest first (then least memory, so the
    smallest adequate card wins a tie). Spot offers are left out: a reclaimed GPU ends the session."""
    chosen = [
        o
        for o in offers
        if not o.spot
        and o.total_vram_gb >= need_gb
        and (gpu_count is None or o.gpu_count == gpu_count)
        and (max_price is None or o.price_per_hour <= max_price)
        and (gpu_type is None or gpu_type in (o.instance_type, o.gpu_name))
        and (o.regions or not with_capacity)
    ]
    return sorted(chosen, key=lambda o: (o.price_per_hour, o.total_vram_gb, o.instance_type))


def explain_no_fit(offers: list[Offer], need_gb: float, *, gpu_count: int | None, max_price: float | None,
                   gpu_type: str | None) -> str:  # fmt: skip
    """Why nothing fits, and the nearest thing that would."""
    limits = dict(gpu_count=gpu_count, gpu_type=gpu_type)
    big_enough = fitting(offers, need_gb, with_capacity=False, **limits)
    if not big_enough:
        more_gpus = fitting(offers, need_gb, with_capacity=False, gpu_type=gpu_type)
        if gpu_count and more_gpus:
            o = more_gpus[0]
            return (f"needs {need_gb:.1f} GB of GPU memory, more than any {gpu_count}-GPU offer has; the cheapest that fits is "
                    f"{o.gpu_name} ×{o.gpu_count} at ${o.price_per_hour:.2f}/h: set gpuCount {o.gpu_count}, or quantize")  # fmt: skip
        largest = max((o.total_vram_gb for o in offers), default=0)
        return f"needs {need_gb:.1f} GB of GPU memory; the largest offer here has {largest} GB: try quantize, or a smaller model"
    in_budget = [o for o in big_enough if max_price is None or o.price_per_hour <= max_price]
    if not in_budget:
        o = big_enough[0]
        return f"needs {need_gb:.1f} GB; the cheapest that fits is {o.gpu_name} ×{o.gpu_count} at ${o.price_per_hour:.2f}/h, above maxPricePerHour ${max_price:.2f}"
    names = ", ".join(sorted({f"{o.gpu_name} ×{o.gpu_count}" for o in in_budget}))
    return f"needs {need_gb:.1f} GB; {names} would fit but have no capacity now: try another region or cloud, or later"
