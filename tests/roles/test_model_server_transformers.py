"""model_server with transformers serve (behind our API key) on a RunPod simulator host, serving
the small vision model: an image request, the same privacy checks as vLLM, and no change on a
second converge."""

from __future__ import annotations

import base64
import io
import json

import pytest
from serving import TINY_VISION, call, check_private_server, converge, site_vars


@pytest.fixture(scope="module")
def served(sim, hosts):
    target = hosts["runpod"]  # root, no systemd: the daemon mode
    extravars = site_vars(sim, TINY_VISION, "transformers")
    events = []
    result = converge(target, extravars, events)
    return target, extravars, result, events


def png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_serves_the_vision_model_privately(served, keypair):
    target, v, result, events = served
    assert result.facts["model_server_engine"] == "transformers-cpu"
    check_private_server(target, keypair, v["model_server_api_key"], TINY_VISION, "gpu-session-transformers-serve.py", events)


def test_answers_an_image_request(served, keypair):
    target, v, _, _ = served
    content = [{"type": "text", "text": "What colour is this?"}, {"type": "image_url", "image_url": {"url": png()}}]
    body = {"model": TINY_VISION, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    status, text = call(target, keypair, "/v1/chat/completions", v["model_server_api_key"], body)
    assert status == 200, text
    assert json.loads(text)["usage"]["prompt_tokens"] > 4  # the image's tokens went in


def test_a_second_converge_changes_nothing(served):
    target, v, _, _ = served
    assert converge(target, v).changed == 0
