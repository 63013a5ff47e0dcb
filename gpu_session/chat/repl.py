"""The interactive chat: prompt_toolkit for input (Enter sends, Esc Enter for a new line, ↑ for
earlier messages), rich to render the answer as markdown while it streams. Ctrl-C stops an answer
without leaving; Ctrl-D (or /exit) leaves.
"""

from __future__ import annotations

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown

from .client import ChatClient, ChatError, printable

HELP = """\
/help           this help
/system TEXT    set the system prompt (starts the conversation again)
/clear          forget the conversation
/exit           leave (Ctrl-D too); Ctrl-C stops an answer"""


def run(client: ChatClient, system: str = "", console: Console | None = None) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory  # input history in memory only: nothing on disk

    console = console or Console()
    session = PromptSession(history=InMemoryHistory())
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    console.print(f"[dim]chatting with {client.model}: /help for commands, Ctrl-D to leave[/]")
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
            command, _, rest = text.partition(" ")
            if command == "/exit":
                return
            if command == "/help":
                console.print(HELP)
            elif command == "/clear":
                messages = [m for m in messages if m["role"] == "system"]
                console.print("[dim]conversation cleared[/]")
            elif command == "/system":
                messages = [{"role": "system", "content": rest}] if rest else []
                console.print("[dim]system prompt set; conversation started again[/]")
            else:
                console.print(f"[red]unknown command {command}[/]: /help lists them")
            continue
        messages.append({"role": "user", "content": text})
        answer = ""
        with Live(Markdown(""), console=console, refresh_per_second=15, vertical_overflow="visible") as live:

            def show(piece: str) -> None:
                nonlocal answer
                answer += piece
                live.update(Markdown(printable(answer)))

            try:
                reply = client.stream(messages, on_token=show)
            except ChatError as e:
                live.stop()
                console.print(f"[red]{e}[/]")
                messages.pop()
                continue
        messages.append({"role": "assistant", "content": reply.text})
        console.print(f"[dim]{reply.stats()}[/]")
