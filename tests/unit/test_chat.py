"""The chat's parts: what it shows, what it sends of a long conversation, /image; and, against a fake
OpenAI-compatible server in this process, an answer cut by a dropped link."""

from __future__ import annotations

import base64
import http.server
import io
import json
import socket
import threading

import pytest
from rich.console import Console

from gpu_session.chat import images
from gpu_session.chat.client import ChatClient, ChatError, Reply, printable
from gpu_session.chat.context import ContextError, ModelFacts, Window
from gpu_session.chat.repl import CUT_MARK, Chat, settled, streamed_markdown


def test_control_characters_from_the_model_are_defused_but_newlines_and_tabs_kept():
    assert printable("a\x1b]0;owned\x07b\n\tc\x9b31md") == "a\ufffd]0;owned\ufffdb\n\tc\ufffd31md"


def test_reply_stats():
    reply = Reply("hello there", first_token_s=0.25, tokens=10, seconds=2.25)
    assert reply.tokens_per_s == 5.0 and reply.stats() == "250 ms to first token, 10 tokens, 5.0 tokens/s"
    assert Reply("", None, 0, 1.0, stopped=True).stats() == "0 tokens, 0.0 tokens/s (stopped)"


def test_reply_stats_name_the_prompt_tokens_when_the_server_counts_them():
    assert Reply("hi", 0.1, 2, 1.1, prompt_tokens=42).stats().endswith("2.0 tokens/s, prompt 42 tokens")


# --- the context window ---


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_a_conversation_that_fits_is_sent_whole():
    window = Window(1000, reserve=100)
    messages = [{"role": "system", "content": "be brief"}, user("a" * 100), assistant("b" * 100), user("c" * 100)]
    assert window.fit(messages) == (messages, 0)


def test_a_long_conversation_keeps_the_system_prompt_and_the_newest_messages_starting_with_the_person():
    window = Window(1000, reserve=100)
    system = {"role": "system", "content": "be brief"}
    old = [user("a" * 300), assistant("b" * 300), user("c" * 300), assistant("d" * 300)]
    sent, dropped = window.fit([system, *old, user("e" * 100)])
    assert sent == [system, user("c" * 300), assistant("d" * 300), user("e" * 100)] and dropped == 2
    assert window.tokens(sent) <= 900
    # The pair is dropped whole: an assistant message never opens what is sent.
    sent, dropped = Window(700, reserve=100).fit([system, *old, user("e" * 100)])
    assert sent == [system, user("e" * 100)] and dropped == 4


def test_a_message_too_long_alone_is_refused_with_its_size():
    with pytest.raises(ContextError, match=r"about 1,008 tokens .* holds 1,000, 100 of them kept for the answer: shorten it"):
        Window(1000, reserve=100).fit([user("x" * 1000)])


def test_an_unknown_context_sends_everything():
    messages = [user("x" * 10**6)]
    assert Window(None, reserve=256).fit(messages) == (messages, 0)


def test_an_answer_longer_than_the_context_has_left_is_cut_to_fit():
    window = Window(1000, reserve=500)
    sent = [user("x" * 392)]  # 400 tokens with the template
    assert window.answer_limit(sent, 4000) == 600 and window.answer_limit(sent, 100) == 100
    assert window.answer_limit(sent, None) is None and Window(None, reserve=256).answer_limit(sent, 4000) == 4000


def test_the_servers_count_teaches_the_bytes_per_token_and_images_count_apart():
    window = Window(2048, reserve=256)
    sent = [user("word " * 400)]  # 2000 bytes, counted by the server as 508 tokens (500 + the template's 8)
    window.learn(sent, 508)
    assert window.bytes_per_token == pytest.approx(2000 / 500 * 0.9)
    window.learn([images_message()], 300)  # a picture's tokens say nothing of text: ignored
    assert window.bytes_per_token == pytest.approx(3.6)
    assert window.tokens([images_message()]) == int(len(b"Describe this image.") / 3.6) + 256 + 8
    window.learn(sent, None)  # a server that does not count changes nothing
    assert window.bytes_per_token == pytest.approx(3.6)


# --- /image ---

PNG_1PX = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc000000301010018dd8db00000000049454e44ae426082"
)


def images_message() -> dict:
    return {
        "role": "user",
        "content": [{"type": "text", "text": "Describe this image."}, {"type": "image_url", "image_url": {"url": "x"}}],
    }


def test_an_image_becomes_a_data_url_part_after_the_question(tmp_path):
    pic = tmp_path / "dot.png"
    pic.write_bytes(PNG_1PX)
    m = images.message(str(pic), "what colour?", vision=True, model="m")
    assert m["content"][0] == {"type": "text", "text": "what colour?"}
    assert m["content"][1]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(PNG_1PX).decode()
    assert images.message(str(pic), vision=True, model="m")["content"][0]["text"] == "Describe this image."


def test_images_are_refused_with_the_reason(tmp_path):
    pic = tmp_path / "dot.png"
    pic.write_bytes(PNG_1PX)
    with pytest.raises(images.ImageError, match="tiny-chat does not take images: start a session with a vision model"):
        images.message(str(pic), vision=False, model="gpu-session/tiny-chat")
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    with pytest.raises(images.ImageError, match="not a PNG, JPEG, GIF or WebP picture"):
        images.message(str(fake), vision=True, model="m")
    with pytest.raises(images.ImageError, match="not a file"):
        images.message(str(tmp_path), vision=True, model="m")
    huge = tmp_path / "huge.png"
    with huge.open("wb") as f:
        f.write(PNG_1PX)
        f.truncate(images.MAX_BYTES + 1)  # sparse: no 10 MB written
    with pytest.raises(images.ImageError, match="larger than 10 MB"):
        images.message(str(huge), vision=True, model="m")


# --- the streamed view ---


def test_the_streamed_view_shows_the_whole_answer_and_redraws_at_most_at_its_frame_rate():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80)
    with streamed_markdown(console, frames_per_s=1) as show:  # one frame a second: only the first piece and the end
        for piece in ["**Hello**", " world", "\x1b]0;owned\x07", *[" more"] * 50, " done"]:
            show(piece)
    screen = out.getvalue()
    assert "world" in screen and "done" in screen and "\x1b]0;owned" not in screen
    assert screen.count("Hello") == 2  # drawn at the first piece and once more at the end, not per piece


def test_finished_blocks_end_at_a_blank_line_outside_code():
    text = "One para.\n\nTwo para.\n\n```python\nx = 1\n\ny = 2"
    assert settled(text, 0) == text.index("```")  # the fence is still open: its blank line does not count
    assert settled(text + "\n```\n\nThree", 0) == len(text + "\n```\n\n")
    assert settled(text, text.index("```")) == text.index("```")  # nothing new is finished
    assert settled("no blank line yet", 0) == 0


# --- a link that drops mid-answer -------------------------------------------------------------


class FakeServer(http.server.ThreadingHTTPServer):
    """An OpenAI-compatible server that streams its answers as SSE chunks. Each entry of `answers`
    is one request's pieces; a None piece ends that answer the way a dying tunnel does: the
    connection closes mid-body, without the chunked encoding's last chunk."""

    daemon_threads = True

    def __init__(self, answers: list[list[str | None]]):
        self.answers, self.requests = answers, []
        super().__init__(("127.0.0.1", 0), FakeHandler)


class FakeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        server = self.server
        server.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        pieces = server.answers[len(server.requests) - 1]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(data: str) -> None:
            event = f"data: {data}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()

        for piece in pieces:
            if piece is None:  # the link drops
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                     "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}  # fmt: skip
            send(json.dumps(chunk))
        send("[DONE]")
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def fake_server():
    servers = []

    def start(answers):
        server = FakeServer(answers)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_an_answer_cut_by_a_dropped_link_is_kept_marked_and_the_next_message_waits_for_the_link(fake_server):
    server = fake_server([["The answer ", "begins", None, "never seen"], ["Back again."]])
    waited = []
    client = ChatClient(f"http://127.0.0.1:{server.server_address[1]}/v1", "key", "m",
                        reconnect=lambda: waited.append(len(server.requests)))  # fmt: skip
    out = io.StringIO()
    chat = Chat(client, ModelFacts("m", None, False, "vllm", "A10 ×1 on lambda"), stack="t",
                console=Console(file=out, width=200))  # fmt: skip

    chat.answer({"role": "user", "content": "Hello"})
    said = out.getvalue()
    assert "The answer begins" in said and "never seen" not in said  # what streamed was shown
    assert "the link to the host dropped mid-answer" in said and "reconnecting" in said
    assert "did not answer" not in said
    assert chat.messages[-1] == {"role": "assistant", "content": "The answer begins" + CUT_MARK}

    chat.answer({"role": "user", "content": "Go on"})
    assert waited == [1]  # the second request waited for the link first
    assert "Back again." in out.getvalue()
    assert server.requests[1]["messages"][1] == {"role": "assistant", "content": "The answer begins" + CUT_MARK}
    assert chat.messages[-1] == {"role": "assistant", "content": "Back again."}


def test_a_link_that_drops_before_the_answer_begins_says_so_and_keeps_nothing(fake_server):
    server = fake_server([[None]])
    client = ChatClient(f"http://127.0.0.1:{server.server_address[1]}/v1", "key", "m", reconnect=lambda: None)
    with pytest.raises(ChatError, match="dropped before the answer began"):
        client.stream([{"role": "user", "content": "Hello"}], on_token=lambda piece: None)
