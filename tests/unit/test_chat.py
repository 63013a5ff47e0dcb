"""What the chat shows: nothing from the model may drive the terminal; the numbers after a reply."""

from __future__ import annotations

from gpu_session.chat.client import Reply, printable


def test_control_characters_from_the_model_are_defused_but_newlines_and_tabs_kept():
    assert printable("a\x1b]0;owned\x07b\n\tc\x9b31md") == "a\ufffd]0;owned\ufffdb\n\tc\ufffd31md"


def test_reply_stats():
    reply = Reply("hello there", first_token_s=0.25, tokens=10, seconds=2.25)
    assert reply.tokens_per_s == 5.0 and reply.stats() == "250 ms to first token, 10 tokens, 5.0 tokens/s"
    assert Reply("", None, 0, 1.0, stopped=True).stats() == "0 tokens, 0.0 tokens/s (stopped)"
