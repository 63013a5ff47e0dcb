"""What the session's model can take, and a long conversation trimmed to fit it.

The context length is the server's own (vLLM's `max_model_len`) where it says, else the model's
config on the Hub; whether it sees images is the Hub's word. Both are read once per stack and kept
in the stack's folder.

Token counts are estimated from UTF-8 bytes: a byte-level tokenizer never makes more tokens than
bytes, so one token per byte is a safe start; after each reply the server's own count of the prompt
teaches the real ratio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gpu_session import sizing
from gpu_session.errors import GpuSessionError
from gpu_session.local import record
from gpu_session.paths import stack_dir, write_private

IMAGE_TOKENS = 256  # an image's share of the context, before the server has said
PER_MESSAGE_TOKENS = 8  # the chat template's role markers around each message
SAFETY = 0.9  # learned ratios are shaded: a tokenizer's rate varies with the text


class ContextError(GpuSessionError, RuntimeError):
    """The newest message alone does not fit: nothing was sent."""


@dataclass
class ModelFacts:
    model: str
    context_length: int | None  # tokens; None: neither the server nor the Hub says
    vision: bool
    backend: str
    gpu: str  # "A10 ×1 on lambda"

    def describe(self) -> str:
        context = f"{self.context_length:,} tokens of context" if self.context_length else "context length unknown"
        sees = "sees images" if self.vision else "text only"
        return f"{self.model}: {context}, {sees}, served by {self.backend} on {self.gpu}"


def facts(stack: str, served_context: int | None = None) -> ModelFacts:
    """The stack's model, as the server (its context, when it says) and the Hub describe it."""
    live = record.load(stack)
    cache = stack_dir(stack, create=False) / "model.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if known.get("model") != live.model:
        try:
            known = {"model": live.model, "vision": sizing.model_info(live.model).vision,
                     "context_length": sizing.context_length(live.model)}  # fmt: skip
            write_private(cache, json.dumps(known).encode())
        except sizing.SizingError:
            known = {}  # the Hub is away: /image is refused, the server still answers; asked again next time
    gpu = f"{live.gpu or '?'} ×{live.gpu_count} on {live.cloud}"
    return ModelFacts(live.model, served_context or known.get("context_length"), bool(known.get("vision")), live.backend, gpu)


def _bytes(message: dict) -> tuple[int, int]:
    """(UTF-8 bytes of text, images) in a message."""
    content = message["content"]
    if isinstance(content, str):
        return len(content.encode()), 0
    text = sum(len(p.get("text", "").encode()) for p in content if p.get("type") == "text")
    return text, sum(1 for p in content if p.get("type") in ("image_url", "image"))


class Window:
    """Keeps each request within the model's context: the system prompt and the newest messages,
    with room left for the answer."""

    def __init__(self, context_length: int | None, reserve: int):
        self.context_length = context_length
        self.reserve = reserve
        self.bytes_per_token = 1.0

    def tokens(self, messages: list[dict]) -> int:
        total = 0
        for m in messages:
            text, images = _bytes(m)
            total += int(text / self.bytes_per_token) + images * IMAGE_TOKENS + PER_MESSAGE_TOKENS
        return total

    def fit(self, messages: list[dict]) -> tuple[list[dict], int]:
        """The messages to send and how many of the oldest were left out. Raises ContextError when
        the system prompt and the newest message alone are too long."""
        if not self.context_length:
            return messages, 0
        room = self.context_length - self.reserve
        system = [m for m in messages if m["role"] == "system"]
        rest = [m for m in messages if m["role"] != "system"]
        dropped = 0
        while self.tokens(system + rest) > room and len(rest) > 1:
            rest.pop(0)
            dropped += 1
            while len(rest) > 1 and rest[0]["role"] != "user":  # a conversation starts with the person
                rest.pop(0)
                dropped += 1
        if self.tokens(system + rest) > room:
            raise ContextError(
                f"this message is about {self.tokens(system + rest):,} tokens with the system prompt; the model holds "
                f"{self.context_length:,}, {self.reserve:,} of them kept for the answer: shorten it"
            )
        return system + rest, dropped

    def answer_limit(self, sent: list[dict], wanted: int | None) -> int | None:
        """`wanted` answer tokens, cut to what the context has left after `sent` (a server refuses a
        request whose prompt and answer together exceed it); None leaves it to the server."""
        if not wanted or not self.context_length:
            return wanted or None
        return max(1, min(wanted, self.context_length - self.tokens(sent)))

    def learn(self, sent: list[dict], prompt_tokens: int | None) -> None:
        """The server counted `prompt_tokens` for `sent`: estimate with its ratio from now on."""
        text = sum(_bytes(m)[0] for m in sent)
        images = sum(_bytes(m)[1] for m in sent)
        counted = (prompt_tokens or 0) - PER_MESSAGE_TOKENS * len(sent)
        if images or counted <= 0 or text <= 0:
            return  # images skew the ratio; a tiny prompt says little
        self.bytes_per_token = max(1.0, text / counted * SAFETY)
