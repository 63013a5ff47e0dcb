"""The one rule for what a model needs and what a machine gives it: which of a repo's files are the
weights the engine loads, the KV cache a token of context takes, and the longest context a
machine's memory holds beside the weights.

Both sides of a session use it: gpu_session.sizing before anything is launched (with the memory
the GPUs report, from gpu_session.clouds.gpus), and the model_server role on the host before it
downloads a byte (the role ships this very file as gpu_session_fit.py beside its check script, with
the memory nvidia-smi reports). So a plan made on the laptop is the plan the host serves, and the
context the role gives vLLM (`--max-model-len`) is one its KV cache holds: vLLM never refuses to
start over context.

Standard library only: the host runs it with nothing but huggingface_hub installed. Sizes in bytes
unless a name says GiB (1024³ bytes); contexts in tokens.
"""

from __future__ import annotations

import fnmatch
import math

GIB = 1024**3
GB = 1_000_000_000  # the clouds size and bill volumes in GB (10^9 bytes): a volume's size_gb
# The share of each GPU's memory vLLM takes (its --gpu-memory-utilization default, 0.9).
GPU_MEMORY_UTILIZATION = 0.9
# Per GPU, out of that share: the CUDA context, the activations of a profiling batch and the CUDA
# graphs vLLM captures. vLLM measures these on the host; 1.5 GiB covers them for the 1B–70B models we
# plan for (vLLM's profile of an 8B model at 8,192 batched tokens peaks near 1 GiB beyond the weights).
ALLOWANCE_GIB = 1.5
# vLLM's CPU build keeps its KV cache in host memory, VLLM_CPU_KVCACHE_SPACE GiB of it (the role's
# model_server_cpu_kvcache_gb): on a host without a GPU that is the context's room.
CPU_KVCACHE_GIB = 1
# The KV cache vLLM ends up with is a little less than the room we compute (block rounding, its own
# bookkeeping): the context served is this share of what the room holds, so it always fits.
CONTEXT_MARGIN = 0.97
# The context a session plans for when it is not told one: the model's own, or this, whichever is smaller.
DEFAULT_CONTEXT = 8192
# --quantize: 4-bit weights where a 16-bit checkpoint would be (bitsandbytes), plus scales.
QUANTIZED_SHARE = 0.3
# An engine's venv: CUDA torch and its libraries (vLLM's CUDA build's, measured: about 10 GiB).
ENGINE_VENV_GIB = 10
# Disk beside the weights: the engine's venv, the Hub download tool, logs and the OS's own use.
# model_server's vars/main.yml reads this line with a regex (one line, `NAME = <whole number>`).
ENGINE_DISK_GIB = 20
# Hub files that are never the weights an engine loads: other formats and original checkpoints.
NOT_WEIGHTS = ("original/*", "*.pth", "*.gguf", "*.onnx", "*.msgpack", "*.h5", "*.tflite", "*.ot")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def weight_files(files: dict[str, int], index: dict | None = None) -> dict[str, int]:
    """The weights an engine loads from a repo whose files are `files` (name → bytes): one format,
    safetensors over .bin (transformers' and vLLM's order), and of it the files the index's
    weight_map names where there is an index (`index`, the parsed model.safetensors.index.json or
    pytorch_model.bin.index.json, whichever format won), else the repo's top-level files of that
    format; a checkpoint in another layout beside the HF shards (Mistral's consolidated.safetensors)
    is never counted, nor downloaded. {} when the repo has none (GGUF only, or no weights)."""
    top = {name: size for name, size in files.items() if "/" not in name}
    for suffix in WEIGHT_SUFFIXES:
        found = {n: s for n, s in top.items() if n.endswith(suffix) and n != "training_args.bin"}
        if not found:
            continue
        named = set((index or {}).get("weight_map", {}).values()) if isinstance(index, dict) else set()
        if named and named <= set(found):
            return {n: found[n] for n in sorted(named)}
        hf_layout = {n: s for n, s in found.items() if not n.startswith("consolidated")}
        return dict(sorted((hf_layout or found).items()))
    return {}


def weight_format(weights: dict[str, int]) -> str | None:
    """safetensors, bin, or None for no weights."""
    return next((s.lstrip(".") for s in WEIGHT_SUFFIXES if any(n.endswith(s) for n in weights)), None)


def index_file(files: dict[str, int]) -> str | None:
    """The index to read for weight_files: safetensors' when the repo has safetensors weights."""
    if any(n.endswith(".safetensors") and "/" not in n for n in files):
        return SAFETENSORS_INDEX if SAFETENSORS_INDEX in files else None
    return BIN_INDEX if BIN_INDEX in files else None


def downloads(files: dict[str, int], weights: dict[str, int]) -> list[str]:
    """What the host downloads: the chosen weights and every other file that is not a weight file
    of any format (config, tokenizer, templates, …)."""
    others = [
        n for n in files
        if not n.endswith(WEIGHT_SUFFIXES) and not any(fnmatch.fnmatch(n, p) for p in NOT_WEIGHTS)
    ]  # fmt: skip
    return sorted({*weights, *others})


def text_config(config: dict) -> dict:
    """The language model's section of a config.json: `text_config` (transformers' vision models),
    `llm_config` (InternVL's), or the config itself."""
    for key in ("text_config", "llm_config"):
        if isinstance(config.get(key), dict) and config[key]:
            return {**config, **config[key]}
    return config


# The keys vLLM takes the model's longest context from, the smallest of those present
# (vllm/transformers_utils/model_arch_config_convertor.py), and the length it assumes when there is
# none; it also caps at tokenizer_config.json's model_max_length (vllm/config/model.py).
MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")  # fmt: skip
ENGINE_DEFAULT_CONTEXT = 2048


def model_context(config: dict, tokenizer: dict | None = None) -> int:
    """The longest context vLLM serves the model at (tokens): the smallest of config.json's length
    keys and the tokenizer's model_max_length, or ENGINE_DEFAULT_CONTEXT where none says. A longer
    --max-model-len is refused at start."""
    text = text_config(config)
    found = [text[k] for k in MAX_LEN_KEYS if isinstance(text.get(k), int) and not isinstance(text[k], bool) and text[k] > 0]
    if not found:
        return ENGINE_DEFAULT_CONTEXT
    limit = (tokenizer or {}).get("model_max_length")
    return min(found + ([int(limit)] if isinstance(limit, int | float) and 0 < limit < 2**62 else []))


def default_context(config: dict, tokenizer: dict | None = None, asked: int | None = None) -> int:
    """The context a session must hold: `asked`, else the model's own or DEFAULT_CONTEXT, the smaller."""
    return asked or min(model_context(config, tokenizer), DEFAULT_CONTEXT)


def kv_bytes_per_token(config: dict) -> int | None:
    """Bytes of KV cache one token takes across all layers (config.json's shapes, in its dtype):
    2 (K and V) × layers × KV heads × head size × dtype bytes; for multi-head latent attention
    (DeepSeek V2/V3: kv_lora_rank) one latent of kv_lora_rank + qk_rope_head_dim per layer. None
    when the config lacks a shape. Llama-3.1-8B: 2 × 32 × 8 × 128 × 2 = 131,072 (128 KiB).
    Sliding-window layers (Gemma 2 and 3) are counted as full attention: more than they take, never less."""
    text = text_config(config)
    layers, heads = text.get("num_hidden_layers"), text.get("num_attention_heads")
    dtype = str(text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or "bfloat16")
    size = 4 if dtype in ("float32", "float") else 2
    if not isinstance(layers, int) or layers <= 0:
        return None
    if isinstance(text.get("kv_lora_rank"), int):
        return layers * (text["kv_lora_rank"] + int(text.get("qk_rope_head_dim") or 0)) * size
    if not isinstance(heads, int) or heads <= 0:
        return None
    # Falcon says num_kv_heads, or multi_query for one; without either, every head has its own.
    kv_heads = text.get("num_key_value_heads") or text.get("num_kv_heads") or (1 if text.get("multi_query") else heads)
    head_dim = text.get("head_dim") or (text.get("hidden_size") or 0) // heads
    if not head_dim:
        return None
    return 2 * layers * int(kv_heads) * int(head_dim) * size


def kv_space(device: str, cpu_kvcache_gib: float = CPU_KVCACHE_GIB) -> int | None:
    """Bytes of a KV cache space of its own (vLLM's CPU build), or None on a GPU (the room beside the weights)."""
    return int(cpu_kvcache_gib * GIB) if device == "cpu" else None


def room(memory_mib: float, gpus: int, *, share: float = GPU_MEMORY_UTILIZATION) -> int:
    """Bytes a machine's GPUs give the weights and the KV cache: what they report (`memory_mib`,
    all GPUs together, as nvidia-smi's memory.total sums), times the share vLLM takes, less the
    allowance on each GPU."""
    return max(0, int(memory_mib * 1024**2 * share - ALLOWANCE_GIB * GIB * gpus))


def weights_in_memory(weights_bytes: int, quantized: bool = False, config: dict | None = None) -> int:
    """Bytes the weights take in GPU memory. Quantized to 4 bits (bitsandbytes), QUANTIZED_SHARE of
    them, but the embeddings and the LM head (vocabulary × hidden size each, one when tied), which
    stay 16-bit."""
    if not quantized:
        return weights_bytes
    text = text_config(config or {})
    vocab, hidden = text.get("vocab_size"), text.get("hidden_size")
    full = (
        (1 if text.get("tie_word_embeddings") else 2) * vocab * hidden * 2
        if isinstance(vocab, int) and isinstance(hidden, int)
        else 0
    )
    full = min(full, weights_bytes)
    return int((weights_bytes - full) * QUANTIZED_SHARE) + full


def need(weights_bytes: int, kv_per_token: int | None, context: int) -> int:
    """Bytes of room a model needs to serve `context` tokens: its weights (in memory) and that
    context's KV cache, with CONTEXT_MARGIN's slack (so a machine with this room holds the context:
    context_held ≥ context); where the KV shape is unknown, a fifth of the weights, as before."""
    kv = math.ceil(kv_per_token * context / CONTEXT_MARGIN) if kv_per_token else weights_bytes // 5
    return weights_bytes + kv


def context_held(room_bytes: int, weights_bytes: int, kv_per_token: int | None, model_max: int,
                 kv_space: int | None = None) -> int:  # fmt: skip
    """The longest context a machine serves: what its KV cache holds (the room left beside the
    weights, or `kv_space` bytes where the KV cache has a space of its own, as on vLLM's CPU build),
    capped at the model's own (model_context). Where the KV shape is unknown, the model's own or
    DEFAULT_CONTEXT, the smaller (need() kept a fifth of the weights for it). 0 when nothing is left."""
    kv = room_bytes - weights_bytes if kv_space is None else min(kv_space, room_bytes - weights_bytes)
    if kv <= 0:
        return 0
    if not kv_per_token:
        return min(model_max, DEFAULT_CONTEXT)
    return min(int(kv * CONTEXT_MARGIN) // kv_per_token, model_max)


def disk_gib(download_bytes: int) -> int:
    """The disk a session needs (GiB): what the host downloads (downloads()), the engine, and a
    tenth more, up to a multiple of 10."""
    return int(math.ceil((download_bytes / GIB * 1.1 + ENGINE_DISK_GIB) / 10) * 10)


def cache_need(model_bytes: int, engine_missing: bool = True) -> int:
    """Bytes a cache volume must have free for a session: room to install the engine
    (ENGINE_DISK_GIB, while it is not on the volume) and `model_bytes`, the model's files it
    downloads onto the volume (0 when they stay off it). The host checks it before downloading (the
    model helper's `check`); the plan warns where a RunPod volume's size is under it, and
    `cache create` refuses a size under an engine's install."""
    return (ENGINE_DISK_GIB * GIB if engine_missing else 0) + model_bytes
