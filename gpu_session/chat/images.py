"""/image: a local picture sent as an image part of a message (a data: URL, so it never touches the
host's disk), checked before anything is sent."""

from __future__ import annotations

import base64
from pathlib import Path

from gpu_session.errors import GpuSessionError

MAX_BYTES = 10 * 1024**2
DEFAULT_QUESTION = "Describe this image."


class ImageError(GpuSessionError, ValueError):
    """Refused; the message says why, and nothing was sent."""


def _media_type(head: bytes) -> str | None:
    """The picture's type from its first bytes (never from its name)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def message(path: str, question: str = "", *, vision: bool, model: str) -> dict:
    """A user message with the picture at `path` and the question about it."""
    if not vision:
        raise ImageError(f"{model} does not take images: start a session with a vision model (e.g. a -VL one) for /image")
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise ImageError(f"{path}: not a file")
    if resolved.stat().st_size > MAX_BYTES:
        raise ImageError(f"{path}: larger than {MAX_BYTES // 1024**2} MB; send a smaller picture")
    data = resolved.read_bytes()
    kind = _media_type(data[:16])
    if kind is None:
        raise ImageError(f"{path}: not a PNG, JPEG, GIF or WebP picture")
    url = f"data:{kind};base64,{base64.b64encode(data).decode()}"
    return {
        "role": "user",
        "content": [{"type": "text", "text": question or DEFAULT_QUESTION}, {"type": "image_url", "image_url": {"url": url}}],
    }
