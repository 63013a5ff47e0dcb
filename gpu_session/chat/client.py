"""A streaming client for the session's model server, through the tunnel, with the session's key.

Nothing here logs what is said: the conversation lives in memory (and in the encrypted history,
when there is one), never in a log line.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gpu_session.errors import GpuSessionError
from gpu_session.local import record, tunnel


class ChatError(GpuSessionError, RuntimeError):
    pass


# C0 and C1 control characters but newline and tab: a model's output must not drive the terminal
# (escape sequences can retitle, recolour, or hide text).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    return _CONTROL.sub("\ufffd", text)


@dataclass
class Reply:
    text: str
    first_token_s: float | None  # from sending to the first token
    tokens: int
    seconds: float
    stopped: bool = False  # cut short by the person
    prompt_tokens: int | None = None  # the server's count of what was sent, where it says
    cut: bool = False  # the link dropped mid-answer: `text` is what came before

    @property
    def tokens_per_s(self) -> float:
        generating = self.seconds - (self.first_token_s or 0)
        return self.tokens / generating if generating > 0 else 0.0

    def stats(self) -> str:
        first = f"{self.first_token_s * 1000:.0f} ms to first token, " if self.first_token_s is not None else ""
        prompt = f", prompt {self.prompt_tokens} tokens" if self.prompt_tokens is not None else ""
        return (
            f"{first}{self.tokens} tokens, {self.tokens_per_s:.1f} tokens/s{prompt}"
            + (" (stopped)" if self.stopped else "")
            + (" (cut: the link dropped)" if self.cut else "")
        )


class ChatClient:
    def __init__(self, base_url: str, api_key: str, model: str, reconnect: Callable[[], object] | None = None):
        """`reconnect` waits until the link is back (a GpuSessionError when it does not come back):
        called before the first request after an answer was cut by a dropped link."""
        from openai import OpenAI

        self.model = model
        # The tunnel may be reconnecting after a dropped link: retry for a while rather than fail.
        self._client = OpenAI(base_url=base_url, api_key=api_key, max_retries=6, timeout=120)
        self._reconnect = reconnect
        self._link_dropped = False

    @classmethod
    def for_stack(cls, stack: str) -> ChatClient:
        """The client for a stack that is up: its tunnel (started if it is not running), key and model."""
        live = record.load(stack)  # NotUp, saying what to do
        port = tunnel.start(stack).port  # TunnelError, saying why
        return cls(f"http://127.0.0.1:{port}/v1", live.api_key_file.read_text().strip(), live.served_model_name,
                   reconnect=lambda: tunnel.reconnected(stack, port))  # fmt: skip

    def _wait_for_link(self) -> None:
        """After a dropped link, wait for the tunnel rather than spend the client's retries on it."""
        if not self._link_dropped or self._reconnect is None:
            return
        try:
            self._reconnect()
        except GpuSessionError as e:
            raise ChatError(f"the link to the host is still down: {e}") from None
        self._link_dropped = False

    def stream(self, messages: list[dict], on_token: Callable[[str], None], stop: threading.Event | None = None,
               max_tokens: int | None = None) -> Reply:  # fmt: skip
        """Send the conversation; each piece of the answer goes to on_token as it arrives. Setting
        `stop` (or Ctrl-C) ends the generation early: what came so far is the reply. A link that
        drops mid-answer (the tunnel's ssh dies) ends it too, marked `cut`; the next call waits
        for the link to come back."""
        import httpx
        from openai import APIConnectionError, APIStatusError, OpenAIError

        self._wait_for_link()
        started = time.monotonic()
        first, pieces, stopped, cut, prompt_tokens = None, [], False, False, None
        try:
            response = self._client.chat.completions.create(
                model=self.model, messages=messages, stream=True, stream_options={"include_usage": True},
                **({"max_tokens": max_tokens} if max_tokens else {}),
            )  # fmt: skip
            try:
                for chunk in response:
                    if stop is not None and stop.is_set():
                        stopped = True
                        break
                    if chunk.usage is not None:
                        prompt_tokens = chunk.usage.prompt_tokens
                    piece = chunk.choices[0].delta.content if chunk.choices else None
                    if piece:
                        first = first if first is not None else time.monotonic() - started
                        pieces.append(piece)
                        on_token(piece)
            except KeyboardInterrupt:
                stopped = True
            except (APIConnectionError, httpx.TransportError):
                # The answer had begun: the server did answer, the link under it went. httpx's own
                # error is what an interrupted body raises; openai's, where a version wraps it.
                self._link_dropped = cut = True
                if not pieces:
                    raise ChatError(
                        "the link to the host dropped before the answer began; the tunnel is reconnecting: send the message again"
                    ) from None
            finally:
                response.close()  # stops the generation on the server too
        except APIStatusError as e:  # it answered, with an error: say what it said
            raise ChatError(f"the model server refused the request ({e.status_code}): {e.message}") from None
        except OpenAIError as e:
            raise ChatError(f"the model server did not answer: {e}") from None
        return Reply("".join(pieces), first, len(pieces), time.monotonic() - started, stopped, prompt_tokens, cut)

    def served_context(self) -> int | None:
        """The context length the server enforces, where it says (vLLM's max_model_len)."""
        from openai import OpenAIError

        try:
            served = [m for m in self._client.models.list().data if m.id == self.model]
        except OpenAIError:
            return None
        length = (served[0].model_extra or {}).get("max_model_len") if served else None
        return int(length) if isinstance(length, int | float) else None
