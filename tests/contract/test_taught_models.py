"""The simulator's small models talk: built here (in a temporary folder), each answers what it was
taught, exactly, when transformers decodes greedily through the chat template, as `transformers
serve` calls it. Without torch, tiny-chat is built untrained and the simulator says so; a model
that did not learn its replies is never kept."""

from __future__ import annotations

import base64
import io
import logging

import pytest

from gpu_session.sim import models
from gpu_session.sim.models import (
    COLOUR_QUESTION,
    COLOUR_REPLIES,
    COLOURS,
    KNOWN_REPLIES,
    NAMED_COLOURS,
    STORY,
    STORY_PROMPTS,
    SYSTEM_PROMPTS,
    TINY_TEXT,
    TINY_VISION,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("models")
    return {repo: models.ensure_built(cache, repo) for repo in (TINY_TEXT, TINY_VISION)}


@pytest.fixture(scope="module")
def chat(built):
    """A greedy reply from a model's files, as transformers serve makes one: (text, how it ended)."""
    loaded = {}

    def reply(repo: str, messages: list[dict], max_new_tokens: int = 48) -> tuple[str, str]:
        if repo not in loaded:
            auto = transformers.AutoModelForImageTextToText if repo == TINY_VISION else transformers.AutoModelForCausalLM
            model = auto.from_pretrained(built[repo], dtype=torch.bfloat16)
            loaded[repo] = model, transformers.AutoProcessor.from_pretrained(built[repo])
        model, processor = loaded[repo]
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        tokenizer = getattr(processor, "tokenizer", processor)
        ended = "stop" if new[-1] == tokenizer.eos_token_id else "length"
        return tokenizer.decode(new, skip_special_tokens=True), ended

    return reply


def user(content) -> dict:
    return {"role": "user", "content": content}


def picture(rgb: tuple[int, int, int], size=(56, 56)) -> dict:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return {"type": "image", "url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}


@pytest.mark.parametrize("repo", [TINY_TEXT, TINY_VISION])
def test_each_known_exchange_alone_under_a_system_prompt_and_as_a_later_turn(chat, repo):
    known = list(KNOWN_REPLIES[repo].items())
    assert KNOWN_REPLIES[repo]["Say hello"] == f"Hello! I am {repo.split('/')[1]}, the gpu-session simulator's model."
    for i, (prompt, reply) in enumerate(known):
        earlier, answer = known[(i + 2) % len(known)]
        for messages in (
            [user(prompt)],
            [{"role": "system", "content": SYSTEM_PROMPTS[i % len(SYSTEM_PROMPTS)]}, user(prompt)],
            [user(earlier), {"role": "assistant", "content": answer}, user(prompt)],
        ):
            assert chat(repo, messages) == (reply, "stop"), messages


def test_the_story_goes_on_until_max_tokens(chat):
    for prompt in STORY_PROMPTS:
        said, ended = chat(TINY_TEXT, [user(prompt)], max_new_tokens=96)
        assert said.startswith(STORY * 2) and ended == "length", said


@pytest.mark.parametrize("colour", list(COLOURS))
def test_the_vision_model_names_the_colour_of_a_plain_picture(chat, colour):
    for rgb, size in ((COLOURS[colour], (56, 56)), (NAMED_COLOURS[colour], (64, 48))):
        for content in ([{"type": "text", "text": COLOUR_QUESTION}, picture(rgb, size)],
                        [picture(rgb, size), {"type": "text", "text": COLOUR_QUESTION}]):  # fmt: skip
            assert chat(TINY_VISION, [user(content)]) == (COLOUR_REPLIES[colour], "stop"), (rgb, size)


def test_without_torch_tiny_chat_is_built_untrained_and_the_simulator_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(models, "teaching_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="gpu_session.sim.models"):
        folder = models.ensure_built(tmp_path, TINY_TEXT)
    assert folder.name.endswith("-untrained")  # built again, taught, once torch is here
    assert "random weights" in (folder / "README.md").read_text()
    [line] = [r.getMessage() for r in caplog.records]
    assert "replies are random" in line and "pip install 'gpu-session[sim-vision]'" in line
    assert models.safetensors_params(folder / "model.safetensors") > 100_000


def test_a_model_that_did_not_learn_its_replies_is_not_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "TEACH_STEPS", 3)
    with pytest.raises(models.TeachingFailed, match=r"tiny-chat did not learn \d+ of \d+ replies: 'Say hello'"):
        models.ensure_built(tmp_path, TINY_TEXT)
    assert not [p for p in tmp_path.rglob("*") if p.is_dir() and p.name == "gpu-session--tiny-chat"]
