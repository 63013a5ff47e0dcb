"""Model → what it needs → the offers that fit, cheapest first, and every refusal that can be
made before anything is launched.

What a model needs is read from the Hub before launch: its files (of which gpu_session.fit picks
the weights the engine will load and the host will download), config.json (the KV cache a token
takes, the model's own context, custom code), the chat template, and whether the token can
download the files. gpu_session.fit's rule decides what fits and what context each offer gives;
the model_server role checks with the same rule on the host, so a plan made here is served there.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gpu_session import fit
from gpu_session.errors import GpuSessionError

from .clouds import Offer

GIB = fit.GIB  # sizes are GiB (1024³ bytes) throughout
# The engines' locks are x86_64 wheels (gpu_session.host.engines); Arm machines cannot run them.
ENGINE_ARCHES = ("x86_64",)

# Architectures vLLM implements (vllm/model_executor/models/registry.py, the ones of the models
# people rent GPUs for); any other is served by transformers serve. Multimodal ones only on a GPU:
# our CPU engine serves text, transformers serve the rest.
VLLM_TEXT = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM",
    "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
    "Phi3ForCausalLM", "PhiForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "GPT2LMHeadModel",
    "GPTNeoXForCausalLM", "FalconForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM", "GraniteForCausalLM",
    "CohereForCausalLM", "Cohere2ForCausalLM", "StableLmForCausalLM", "Starcoder2ForCausalLM", "InternLM2ForCausalLM",
    "ExaoneForCausalLM", "GlmForCausalLM", "Glm4ForCausalLM", "SmolLM3ForCausalLM", "GptOssForCausalLM",
})  # fmt: skip
VLLM_MULTIMODAL = frozenset({
    "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration", "Idefics3ForConditionalGeneration", "Gemma3ForConditionalGeneration",
    "MllamaForConditionalGeneration", "InternVLChatModel", "Mistral3ForConditionalGeneration",
    "PixtralForConditionalGeneration", "Phi3VForCausalLM", "MiniCPMV", "PaliGemmaForConditionalGeneration",
})  # fmt: skip

# The Hub's repo ids: owner/name, letters, digits, - _ . (the roles refuse anything else too).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


class SizingError(GpuSessionError, ValueError):
    """The model cannot be looked up, cannot be served, or nothing within the limits fits it; the
    message says what to do."""


@dataclass(frozen=True)
class ModelInfo:
    """What the Hub says of a model, as much as sizing and preflight need."""

    id: str
    files: dict[str, int]  # every file of the repo: name → bytes
    gated: bool
    vision: bool
    sha: str = ""
    config: dict = field(default_factory=dict)  # config.json; {} when the repo has none
    index: dict | None = None  # the weights' index (model.safetensors.index.json), where there is one
    chat_template: bool = True  # a chat template in tokenizer_config.json or a file of its own
    tokenizer: dict = field(default_factory=dict)  # tokenizer_config.json; {} when the repo has none
    private: bool = False  # the Hub's `private`: only its owner's tokens read it

    def may_cache(self, cache_gated: bool) -> bool:
        """Whether its weights may go on a cache volume, which outlives the session and its token:
        public ungated weights always; gated or private ones only when the user said so (--cache-gated)."""
        return not (self.gated or self.private) or cache_gated

    @property
    def weights(self) -> dict[str, int]:
        """The files the engine loads and the host downloads (gpu_session.fit.weight_files)."""
        return fit.weight_files(self.files, self.index)

    @property
    def weights_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def kv_bytes_per_token(self) -> int | None:
        return fit.kv_bytes_per_token(self.config)

    @property
    def max_context(self) -> int:
        """The longest context the engine serves the model at (tokens; gpu_session.fit.model_context)."""
        return fit.model_context(self.config, self.tokenizer)

    @property
    def architectures(self) -> list[str]:
        return [a for a in self.config.get("architectures") or [] if isinstance(a, str)]

    @property
    def custom_code(self) -> bool:
        """Its config points at code in the repo (auto_map): no engine loads it without trust_remote_code."""
        return bool(self.config.get("auto_map"))

    def default_context(self, asked: int | None = None) -> int:
        """The context a session plans for: `asked`, else the model's own or fit.DEFAULT_CONTEXT, the smaller."""
        return fit.default_context(self.config, self.tokenizer, asked)

    def weights_in_memory(self, quantize: bool = False) -> int:
        return fit.weights_in_memory(self.weights_bytes, quantize, self.config)

    def need_bytes(self, context: int | None = None, quantize: bool = False) -> int:
        """Room (bytes) it needs to serve `context` tokens (default_context() when None)."""
        return fit.need(self.weights_in_memory(quantize), self.kv_bytes_per_token, self.default_context(context))

    def need_gb(self, context: int | None = None, quantize: bool = False) -> float:
        """need_bytes in GiB, up to 0.1."""
        return gib_up(self.need_bytes(context, quantize))

    def context_on(self, offer: Offer, quantize: bool = False, device: str = "cuda") -> int:
        """The longest context `offer` serves (tokens; 0 when unknown: the engine decides): what its
        KV cache holds beside the weights, capped at the model's own. On a host without a GPU (the
        simulator's) vLLM's CPU KV cache space caps it too."""
        return fit.context_held(fit.room(offer.memory_mib, offer.gpu_count), self.weights_in_memory(quantize),
                                self.kv_bytes_per_token, self.max_context, fit.kv_space(device))  # fmt: skip

    def backend(self, device: str = "cuda") -> str:
        """vLLM where it serves the architecture on `device` (its multimodal models on a GPU only),
        transformers serve otherwise."""
        archs = set(self.architectures)
        if archs & VLLM_TEXT or (device == "cuda" and archs & VLLM_MULTIMODAL):
            return "vllm"
        return "transformers"

    @property
    def download_bytes(self) -> int:
        """What the host downloads of the repo (gpu_session.fit.downloads): the weights and the small files."""
        return sum(self.files[f] for f in fit.downloads(self.files, self.weights))

    def disk_gb(self) -> int:
        """The disk (GiB) a session of it needs: what the host downloads and the engine (gpu_session.fit.disk_gib)."""
        return fit.disk_gib(self.download_bytes)

    def check_disk(self, disk_gb: int | None, *, option: str = "--disk") -> int:
        """The disk (GiB) to give the session: disk_gb() unless `disk_gb` is larger; SizingError
        when `disk_gb` is smaller (the default can only be raised)."""
        need = self.disk_gb()
        if disk_gb is not None and disk_gb < need:
            raise SizingError(
                f"{self.id} needs {need} GiB of disk ({gib(self.weights_bytes)} of weights, the other files and the engine): "
                f"{option} {disk_gb} is too small; leave it out (it is sized from the weights) or give {need} or more"
            )
        return max(need, disk_gb or 0)


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
    """The Hub's description of `model` (HF_ENDPOINT honoured): its file list with sizes, and its
    config.json, the weights' index and the chat template, read from the repo. Raises SizingError."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    token = token or os.environ.get("HF_TOKEN") or None
    try:
        info = hub().model_info(model, files_metadata=True, token=token)
    except RepositoryNotFoundError:
        near = suggest(model) or (
            "; check the id on the Hub (owner/name, as the model's page shows it), or, for a private or gated"
            " model, export HF_TOKEN with a token that can read it"
        )
        raise SizingError(f"{model} is not on the Hub, or is private and the HF token cannot see it{near}") from None
    except HfHubHTTPError as e:
        raise SizingError(f"the Hub could not describe {model}: {one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 (connection refused, DNS, timeouts, in whatever class the HTTP library of the day raises)
        raise SizingError(f"the Hub at {os.environ.get('HF_ENDPOINT') or 'huggingface.co'} is unreachable: {e}") from None
    files = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    sha = info.sha or "main"

    def read(name: str) -> dict | None:
        return repo_json(model, name, sha, token) if name in files else None

    config = read("config.json") or {}
    index_name = fit.index_file(files)
    tokenizer = read("tokenizer_config.json") or {}
    tags = set(info.tags or [])
    vision = info.pipeline_tag in ("image-text-to-text", "image-to-text") or "vision" in tags or "vision_config" in config
    return ModelInfo(
        model, files, bool(info.gated), vision, info.sha or "", config=config,
        index=read(index_name) if index_name else None,
        chat_template=bool(tokenizer.get("chat_template")) or any(f in files for f in CHAT_TEMPLATE_FILES),
        tokenizer=tokenizer, private=bool(getattr(info, "private", False)),
    )  # fmt: skip


def one_line(error: Exception) -> str:
    """An HTTP library's error, which runs to several lines (a URL, a link to the status's docs), as its first."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def repo_json(model: str, name: str, revision: str, token: str | None) -> dict | None:
    """A small JSON file of the repo (config.json, an index, tokenizer_config.json), or None when it
    cannot be read (gated, or not JSON): the checks that need it then say so themselves."""
    try:
        # A throwaway cache (the simulator's files never mix with the Hub's); a few KB: no progress bar.
        with tempfile.TemporaryDirectory() as cache, quiet_hub():
            path = hub().hf_hub_download(model, name, revision=revision, token=token, cache_dir=cache)
            data = json.loads(Path(path).read_text())
    except Exception:  # noqa: BLE001 (any failure: the file is treated as absent, which preflight names)
        return None
    return data if isinstance(data, dict) else None


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
    token = token or os.environ.get("HF_TOKEN") or None
    config = repo_json(model, "config.json", "main", token)
    if config is None:
        raise SizingError(f"the Hub could not give {model}'s config.json")
    return fit.model_context(config)


def preflight(info: ModelInfo, *, context: int | None = None, trust_remote_code: bool = False,
              token: str | None = None) -> None:  # fmt: skip
    """Every refusal that can be made before launch, from what the Hub says of the model: weights a
    backend loads, a chat template, custom code, a context it has, and a token that can download
    its files (a file is asked for, not the metadata: a gated repo describes itself to anyone).
    Raises SizingError naming the way out; returns when the model can be served."""
    name = info.id
    if not info.weights:
        gguf = sorted(f for f in info.files if f.endswith(".gguf"))
        if gguf:
            raise SizingError(
                f"{name} holds only GGUF files ({', '.join(gguf[:3])}{', …' if len(gguf) > 3 else ''}), which neither vLLM nor "
                "transformers serve here: choose the repo they were made from (its safetensors weights), and --quantize if it must be small"
            )
        raise SizingError(
            f"{name} has no weights an engine loads (no .safetensors or .bin files): check the id, or choose another repo"
        )
    if info.gated:  # first: the files below cannot be read without access
        check_download(info, token or os.environ.get("HF_TOKEN") or None)
    if not info.chat_template:
        raise SizingError(
            f"{name} has no chat template (tokenizer_config.json has no chat_template, and there is no chat_template.jinja): "
            "it completes text but cannot chat; choose its instruct or chat variant"
        )
    if info.custom_code and not trust_remote_code:
        raise SizingError(
            f"{name} runs code from its repo (config.json's auto_map), which no engine loads unless told to: read that code, "
            "then pass --trust-remote-code (stack config trustRemoteCode: true)"
        )
    if context is not None and context > info.max_context:
        raise SizingError(
            f"{name} is served with at most {info.max_context:,} tokens of context (its config's length, its tokenizer's "
            f"model_max_length): ask for --context {info.max_context} or less"
        )


def check_download(info: ModelInfo, token: str | None) -> None:
    """Ask the Hub for one of the weights' files (a HEAD: no byte of it is downloaded) with `token`;
    SizingError when it is refused."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    page = f"{os.environ.get('HF_ENDPOINT') or 'https://huggingface.co'}/{info.id}"
    if not token:
        raise SizingError(f"{info.id} is gated: accept its license at {page}, then export HF_TOKEN=<a token of that account>")
    url = hf_hub_url(info.id, next(iter(info.weights)), revision=info.sha or None, endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        get_hf_file_metadata(url, token=token)
    except GatedRepoError:
        raise SizingError(
            f"{info.id} is gated and this HF token's account may not download it: accept its license at {page} with that "
            "account (or wait for the grant), or export HF_TOKEN of an account that has it"
        ) from None
    except HfHubHTTPError as e:
        raise SizingError(f"the Hub refused {info.id}'s files to this HF token: {one_line(e)}") from None


def usable(offer: Offer) -> bool:
    """An offer a session can run on: on demand (a reclaimed spot GPU ends the session) and a
    machine our engines install on."""
    return not offer.spot and offer.arch in ENGINE_ARCHES


def fitting(offers: list[Offer], need_bytes: int, *, gpu_count: int | None = None, max_price: float | None = None,
            gpu_type: str | None = None, with_capacity: bool = True) -> list[Offer]:  # fmt: skip
    """Offers whose room (gpu_session.fit.room: the memory their GPUs report, the share vLLM takes,
    less the allowance) holds `need_bytes`, cheapest first (then least memory, so the smallest
    adequate card wins a tie). Spot offers and Arm machines are left out."""
    chosen = [
        o
        for o in offers
        if usable(o)
        and fit.room(o.memory_mib, o.gpu_count) >= need_bytes
        and (gpu_count is None or o.gpu_count == gpu_count)
        and (max_price is None or o.price_per_hour <= max_price)
        and (gpu_type is None or gpu_type in (o.instance_type, o.gpu_name))
        and (o.regions or not with_capacity)
    ]
    return sorted(chosen, key=lambda o: (o.price_per_hour, o.memory_mib, o.instance_type))


def gib(n: int | float) -> str:
    return f"{n / GIB:.1f} GiB"


def room_for(room: int, need: int) -> str:
    """ "R GiB usable for N GiB needed" (room and need in bytes): the room rounded down and the need
    up, neither said better than it is, to the fewest decimals (1 to 3) at which a room that holds
    the need does not read smaller than it (18.75 for 18.71 is "18.75 … 18.71", not "18.7 … 18.8")."""
    for digits in (1, 2, 3):
        scale = 10**digits
        shown_room, shown_need = room * scale // GIB / scale, -(-need * scale // GIB) / scale
        if shown_room >= shown_need or room < need:
            break
    if room >= need:  # within 0.001 GiB of each other: said equal
        shown_need = min(shown_need, shown_room)
    return f"{shown_room:.{digits}f} GiB usable for {shown_need:.{digits}f} GiB needed"


def gib_up(n: int) -> float:
    """n bytes in GiB, rounded up to 0.1: a need is never said smaller than it is (the plan's, and why no offer fits)."""
    return -(-n * 10 // GIB) / 10


def explain_no_fit(offers: list[Offer], need_bytes: int, *, gpu_count: int | None, max_price: float | None,
                   gpu_type: str | None) -> str:  # fmt: skip
    """Why nothing fits, and the nearest thing that would: a suggestion above the price cap says so
    (the cap is `up --max-price` and the stack's maxPricePerHour, one setting)."""
    limits = dict(gpu_count=gpu_count, gpu_type=gpu_type)
    cap = f"the price cap of ${max_price:.2f}/h (--max-price, maxPricePerHour)" if max_price is not None else ""
    need = f"{gib_up(need_bytes)} GiB"
    big_enough = fitting(offers, need_bytes, with_capacity=False, **limits)
    if not big_enough:
        more_gpus = fitting(offers, need_bytes, with_capacity=False, gpu_type=gpu_type)
        if gpu_count and more_gpus:
            o = more_gpus[0]
            over = cap and o.price_per_hour > max_price
            return (f"needs {need} of GPU memory, more than any {gpu_count}-GPU offer gives; the cheapest that fits is "
                    f"{o.gpu_name} ×{o.gpu_count} at ${o.price_per_hour:.2f}/h" + (f", above {cap}" if over else "")
                    + f": --gpus {o.gpu_count} (gpuCount)" + (" with a higher --max-price" if over else "")
                    + ", or quantize, or a shorter --context")  # fmt: skip
        allowed = [
            o
            for o in offers
            if (gpu_count is None or o.gpu_count == gpu_count) and (gpu_type is None or gpu_type in (o.instance_type, o.gpu_name))
        ]
        arm = [o for o in allowed if o.arch not in ENGINE_ARCHES and fit.room(o.memory_mib, o.gpu_count) >= need_bytes]
        if allowed and not any(usable(o) for o in allowed):
            return (f"can run on none of the offers asked for: {', '.join(sorted({o.gpu_name for o in allowed}))} machines are "
                    "Arm (aarch64) or spot, which our engines do not install on (or a reclaim ends): choose another --gpu")  # fmt: skip
        largest = max((fit.room(o.memory_mib, o.gpu_count) for o in allowed if usable(o)), default=0)
        return (f"needs {need} of GPU memory; the largest offer here gives {gib(largest)}: try --quantize, a shorter --context, "
                "or a smaller model" + (f" ({', '.join(sorted({o.gpu_name for o in arm}))} would hold it, but its machines are "
                                        "Arm (aarch64), which our engines do not install on yet)" if arm else ""))  # fmt: skip
    in_budget = [o for o in big_enough if max_price is None or o.price_per_hour <= max_price]
    if not in_budget:
        o = big_enough[0]
        return f"needs {need}; the cheapest that fits is {o.gpu_name} ×{o.gpu_count} at ${o.price_per_hour:.2f}/h, above {cap}"
    names = ", ".join(sorted({f"{o.gpu_name} ×{o.gpu_count}" for o in in_budget}))
    return f"needs {need}; {names} would fit but have no capacity now: try another region or cloud, or later"
