"""The interactive chat: prompt_toolkit for input (Enter sends, Esc Enter for a new line, ↑ for
earlier messages), rich to render the answer as markdown while it streams. Ctrl-C stops an answer
without leaving; Ctrl-D (or /exit) leaves.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown

from . import files
from .client import ChatClient, ChatError, printable
from .history import Conversation, History, export

TEXT_INLINE_BYTES = 32 * 1024  # a text file larger than this is uploaded but not put in the conversation

HELP = """\
/help           this help
/system TEXT    set the system prompt (starts the conversation again)
/clear          forget the conversation (a new one begins)
/save [FILE]    export the conversation: Markdown, or JSON for a .json name (default: chat-<id>.md)
/upload PATH    copy a file to the host's uploads folder; a text file also joins the conversation
/download REMOTE [LOCAL]
                copy a file of the session's data root (e.g. uploads/notes.txt) here
/exit           leave (Ctrl-D too); Ctrl-C stops an answer"""


def save_export(conversation: Conversation, name: str, console: Console) -> None:
    path = Path(name or f"chat-{conversation.id}.md").expanduser()
    if path.exists():
        console.print(f"[red]{path} exists[/]: give another name (nothing is overwritten)")
        return
    path.write_text(export(conversation, "json" if path.suffix == ".json" else "markdown"))
    path.chmod(0o600)
    console.print(f"[dim]saved {path}[/]")


def upload(stack: str, path: str, messages: list[dict], console: Console) -> None:
    remote = files.upload(stack, path)
    data = files.local_source(path).read_bytes()
    try:
        text = data.decode() if len(data) <= TEXT_INLINE_BYTES else None
    except UnicodeDecodeError:
        text = None
    if text is not None:
        messages.append({"role": "user", "content": f"File {Path(remote).name}:\n```\n{text}\n```"})
    console.print(f"[dim]uploaded to {remote}" + (" and added to the conversation" if text is not None else "") + "[/]")


def run(client: ChatClient, system: str = "", history: History | None = None, console: Console | None = None,
        stack: str = "dev") -> None:  # fmt: skip
    """The chat loop; each exchange is saved to the (encrypted) history unless history is None."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory  # input history in memory only: nothing on disk

    console = console or Console()
    session = PromptSession(history=InMemoryHistory())
    conversation = Conversation(client.model, [{"role": "system", "content": system}] if system else [])
    messages = conversation.messages
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
                conversation = Conversation(client.model, [m for m in messages if m["role"] == "system"])
                messages = conversation.messages
                console.print("[dim]conversation cleared[/]")
            elif command == "/system":
                conversation = Conversation(client.model, [{"role": "system", "content": rest}] if rest else [])
                messages = conversation.messages
                console.print("[dim]system prompt set; conversation started again[/]")
            elif command == "/save":
                save_export(conversation, rest.strip(), console)
            elif command in ("/upload", "/download"):
                try:
                    if command == "/upload":
                        upload(stack, rest.strip(), messages, console)
                    else:
                        remote, _, local = rest.strip().partition(" ")
                        ask = lambda p: session.prompt(f"{p} exists: overwrite? [y/N] ").strip().lower() == "y"  # noqa: E731
                        console.print(f"[dim]saved {files.download(stack, remote, local.strip() or None, ask)}[/]")
                except files.TransferError as e:
                    console.print(f"[red]{e}[/]")
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
        if history is not None:
            history.save(conversation)
