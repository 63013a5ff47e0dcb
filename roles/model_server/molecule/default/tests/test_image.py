"""The small vision model takes an image part: its tokens reach the model."""

import base64
import io
import json
import os
import sys
from pathlib import Path

import testinfra.utils.ansible_runner

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))
from test_server import KEY, MODEL, request  # noqa: E402

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"]).get_hosts("all")


def png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def prompt_tokens(host, content) -> int:
    status, body = request(
        host, "/v1/chat/completions", KEY, {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    )
    assert status == 200, body
    return json.loads(body)["usage"]["prompt_tokens"]


def test_answers_an_image_request(host):
    text = [{"type": "text", "text": "What colour is this?"}]
    with_image = text + [{"type": "image_url", "image_url": {"url": png()}}]
    assert prompt_tokens(host, with_image) > prompt_tokens(host, text)
