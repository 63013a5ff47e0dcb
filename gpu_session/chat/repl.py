"""The interactive chat: prompt_toolkit for input (Enter sends, Esc Enter for a new line, ↑ for
earlier messages), rich to render the answer as markdown while it streams. Ctrl-C stops an answer
without leaving; Ctrl-D (or /exit) leaves.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.markup import escape

from gpu_session.local.ledger import spend

from . import files, images
from .client import ChatClient, ChatError, Reply, printable
from .context import ContextError, ModelFacts, Window
from .history import Conversation, History, export

TEXT_INLINE_BYTES = 32 * 1024  # a text file larger than this is uploaded but not put in the conversation
FRAMES_PER_S = 15  # the streamed answer is redrawn at most this often, however fast tokens come
CUT_MARK = " […cut: the link dropped]"  # ends an answer the link cut, in the conversation and its history

HELP = """\
/help           this help
/model          the model: name, context length, images or not, backend, GPU
/cost           what the session has cost so far, its rate, the lease left
/system TEXT    set the system prompt (starts the conversation again)
/clear          forget the conversation (a new one begins)
/save [FILE]    export the conversation: Markdown, or JSON for a .json name (default: chat-<id>.md)
/upload PATH    copy a file to the host's uploads folder; a text file also joins the conversation
/download REMOTE [LOCAL]
                copy a file of the session's data root (e.g. uploads/notes.txt) here
/image PATH [QUESTION]
                ask about a picture (PNG, JPEG, GIF, WebP; vision models only)
/exit           leave (Ctrl-D too); Ctrl-C stops an answer"""


def settled(text: str, start: int) -> int:
    """Where the answer's finished blocks end: after the last blank line past `start` that is outside
    a code fence (markdown drawn up to there no longer changes as more text comes), or `start`."""
    cut = text.rfind("\n\n", start)
    while cut >= start and text.count("```", 0, cut) % 2:
        cut = text.rfind("\n\n", start, cut)
    return cut + 2 if cut >= start else start


@contextmanager
def streamed_markdown(console: Console, frames_per_s: float = FRAMES_PER_S):
    """A sink for the answer's pieces that shows it as markdown while it grows. Finished blocks are
    printed once, above the live view, which redraws only the block still growing (so a frame
    costs the same at the end of a long answer as at its start), at most `frames_per_s` times a
    second, and once more at the end."""
    pieces: list[str] = []
    shown, last = 0, 0.0  # how much of the answer is printed for good; when the view was drawn

    def draw(live: Live, final: bool = False) -> None:
        nonlocal shown
        text = printable("".join(pieces))
        cut = len(text) if final else settled(text, shown)
        live.update(Markdown(text[cut:]), refresh=True)  # the view first: printing above it redraws it
        if cut > shown:
            live.console.print(Markdown(text[shown:cut]))
            shown = cut

    with Live(Markdown(""), console=console, auto_refresh=False, vertical_overflow="visible") as live:

        def show(piece: str) -> None:
            nonlocal last
            pieces.append(piece)
            now = time.monotonic()
            if now - last >= 1 / frames_per_s:
                last = now
                draw(live)

        try:
            yield show
        finally:
            draw(live, final=True)  # the rest, printed for good


def save_export(conversation: Conversation, name: str, say: Callable) -> None:
    path = Path(name or f"chat-{conversation.id}.md").expanduser()
    if path.exists():
        say(f"[red]{escape(str(path))} exists[/]: give another name (nothing is overwritten)")
        return
    path.write_text(export(conversation, "json" if path.suffix == ".json" else "markdown"))
    path.chmod(0o600)
    say(f"[dim]saved {escape(str(path))}[/]")


class Chat:
    """One chat with the session's model: the conversation, what is sent of it, and the commands."""

    def __init__(self, client: ChatClient, facts: ModelFacts, *, stack: str, system: str = "",
                 history: History | None = None, console: Console | None = None, max_tokens: int | None = None,
                 ask: Callable[[str], str] = input):  # fmt: skip
        self.client, self.facts, self.stack = client, facts, stack
        self.history, self.max_tokens, self.ask = history, max_tokens, ask
        self.console = console or Console()
        # Our own lines are left for the terminal to wrap, so a narrow one never splits a word.
        self.say = functools.partial(self.console.print, soft_wrap=True)
        # Room kept for the answer: what was asked for, else an eighth of the context (at least 256),
        # never more than half of it.
        context = facts.context_length
        reserve = max_tokens or max(256, (context or 0) // 8)
        self.window = Window(context, min(reserve, context // 2) if context else reserve)
        self.start(system)

    def start(self, system: str = "") -> None:
        self.conversation = Conversation(self.client.model, [{"role": "system", "content": system}] if system else [])

    @property
    def messages(self) -> list[dict]:
        return self.conversation.messages

    # --- sending ---

    def send(self, message: dict, on_token: Callable[[str], None]) -> Reply | None:
        """Send `message` with as much of the conversation as the context holds; the reply, or None
        when nothing was sent (the reason was said)."""
        try:
            sent, dropped = self.window.fit([*self.messages, message])
        except ContextError as e:
            self.say(f"[red]{escape(str(e))}[/]")
            return None
        if dropped:
            self.say(
                f"[yellow]the conversation is longer than the model's {self.facts.context_length:,}-token context: "
                f"its {dropped} oldest message(s) are left out of what is sent[/]"
            )
        reply = self.client.stream(sent, on_token=on_token, max_tokens=self.window.answer_limit(sent, self.max_tokens))
        self.window.learn(sent, reply.prompt_tokens)
        # A cut answer stays, marked: the conversation is one record, both what is sent next and what
        # the history keeps, so the mark tells the model (and an export's reader) that the answer is
        # unfinished rather than complete, and "go on" can pick it up.
        answer = reply.text + CUT_MARK if reply.cut else reply.text
        self.messages.extend([message, {"role": "assistant", "content": answer}])
        if self.history is not None:
            self.history.save(self.conversation)
        return reply

    def answer(self, message: dict) -> None:
        """Send `message` and show the answer as it streams, then its numbers."""
        try:
            with streamed_markdown(self.console) as show:
                reply = self.send(message, show)
        except ChatError as e:
            self.say(f"[red]{escape(str(e))}[/]")
            return
        if reply is None:
            return
        if reply.cut:
            self.say(
                "[yellow]the link to the host dropped mid-answer: what came is kept, marked as cut. "
                "The tunnel is reconnecting; your next message waits for it.[/]"
            )
        self.say(f"[dim]{reply.stats()}[/]")

    # --- commands ---

    def command(self, text: str) -> bool:
        """Do a /command; False when it is time to leave."""
        command, _, rest = text.partition(" ")
        rest = rest.strip()
        say = self.say
        if command == "/exit":
            return False
        if command == "/help":
            say(HELP, markup=False)
        elif command == "/model":
            say(self.facts.describe(), markup=False)
        elif command == "/cost":
            say(spend(self.stack), markup=False)
        elif command == "/clear":
            self.start(next((m["content"] for m in self.messages if m["role"] == "system"), ""))
            say("[dim]conversation cleared[/]")
        elif command == "/system":
            self.start(rest)
            say("[dim]system prompt set; conversation started again[/]")
        elif command == "/save":
            save_export(self.conversation, rest, self.say)
        elif command == "/image":
            path, _, question = rest.partition(" ")
            try:
                message = images.message(path, question.strip(), vision=self.facts.vision, model=self.facts.model)
            except images.ImageError as e:
                say(f"[red]{escape(str(e))}[/]")
            else:
                self.answer(message)
        elif command in ("/upload", "/download"):
            try:
                self.upload(rest) if command == "/upload" else self.download(rest)
            except files.TransferError as e:
                say(f"[red]{escape(str(e))}[/]")
        else:
            say(f"[red]unknown command {escape(command)}[/]: /help lists them")
        return True

    def upload(self, path: str) -> None:
        remote = files.upload(self.stack, path)
        data = files.local_source(path).read_bytes()
        try:
            text = data.decode() if len(data) <= TEXT_INLINE_BYTES else None
        except UnicodeDecodeError:
            text = None
        if text is not None:
            self.messages.append({"role": "user", "content": f"File {Path(remote).name}:\n```\n{text}\n```"})
        self.say(f"[dim]uploaded to {escape(remote)}" + (" and added to the conversation" if text is not None else "") + "[/]")

    def download(self, args: str) -> None:
        remote, _, local = args.partition(" ")
        overwrite = lambda p: self.ask(f"{p} exists: overwrite? [y/N] ").strip().lower() == "y"  # noqa: E731
        saved = files.download(self.stack, remote, local.strip() or None, overwrite)
        self.say(f"[dim]saved {escape(str(saved))}[/]")


def run(chat: Chat) -> None:
    """The chat loop, until Ctrl-D or /exit."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory  # input history in memory only: nothing on disk

    session = PromptSession(history=InMemoryHistory())
    chat.ask = session.prompt
    chat.say(f"[dim]chatting with {chat.client.model}: /help for commands, Ctrl-D to leave[/]")
    while True:
        try:
            text = session.prompt("› ").strip()
        except KeyboardInterrupt:
            continue  # a half-typed line is dropped; leaving is Ctrl-D
        except EOFError:
            return
        if not text:
            continue
        if text.startswith("/"):
            if not chat.command(text):
                return
            continue
        chat.answer({"role": "user", "content": text})
