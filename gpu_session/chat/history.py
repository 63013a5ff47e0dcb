"""Chat history, encrypted at rest, per stack.

Each conversation is one Fernet token in `~/.local/state/gpu-session/history/<stack>/<id>.enc`
(0600). The key lives in the OS keyring (service "gpu-session", one entry per stack) where one
works, else in a 0600 key file in the config dir. Without the key the files are noise; `purge`
deletes the files and the key. Exports (Markdown or JSON) are written only where the person asks.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpu_session.errors import GpuSessionError, our_command
from gpu_session.paths import config_dir, private_dir, state_dir, write_private

SERVICE = "gpu-session"


class HistoryError(GpuSessionError, RuntimeError):
    pass


@dataclass
class Conversation:
    model: str
    messages: list[dict] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    id: str = ""

    def __post_init__(self) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started_at))
        self.id = self.id or f"{stamp}-{int(self.started_at * 1000) % 1000:03d}"


def _keyring():
    """The OS keyring, or None where there is none (a headless Linux box, a container)."""
    try:
        import keyring
        from keyring.backends.fail import Keyring as NoKeyring
    except ImportError:
        return None
    return None if isinstance(keyring.get_keyring(), NoKeyring) else keyring


class History:
    def __init__(self, stack: str):
        self.stack = stack
        self.dir = state_dir() / "history" / stack

    # --- the key ---

    def _key_file(self) -> Path:
        return config_dir() / "history-keys" / f"{self.stack}.key"

    def key(self, create: bool = False) -> bytes | None:
        from cryptography.fernet import Fernet

        ring = _keyring()
        if ring is not None:
            stored = ring.get_password(SERVICE, f"history-{self.stack}")
            if stored is None and create:
                stored = Fernet.generate_key().decode()
                ring.set_password(SERVICE, f"history-{self.stack}", stored)
            return stored.encode() if stored else None
        path = self._key_file()
        if not path.exists():
            if not create:
                return None
            write_private(path, Fernet.generate_key())
        return path.read_bytes().strip()

    def _fernet(self, create: bool = False):
        from cryptography.fernet import Fernet

        key = self.key(create)
        if key is None:
            raise HistoryError(f"no history key for stack {self.stack}: its history was purged, or never written")
        return Fernet(key)

    # --- conversations ---

    def save(self, conversation: Conversation) -> Path:
        token = self._fernet(create=True).encrypt(json.dumps(vars(conversation)).encode())
        return write_private(private_dir(self.dir) / f"{conversation.id}.enc", token)

    def load(self, conversation_id: str) -> Conversation:
        from cryptography.fernet import InvalidToken

        path = self.dir / f"{Path(conversation_id).name}.enc"  # an id, never a path
        if not path.exists():
            raise HistoryError(
                f"no conversation {conversation_id!r} in stack {self.stack}'s history: {our_command('history list')}"
            )
        try:
            return Conversation(**json.loads(self._fernet().decrypt(path.read_bytes())))
        except InvalidToken:
            raise HistoryError(f"{path} does not open with this stack's key") from None

    def ids(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.enc")) if self.dir.exists() else []

    def purge(self) -> int:
        """Delete every conversation and the key; how many conversations there were."""
        ids = self.ids()
        for conversation_id in ids:
            (self.dir / f"{conversation_id}.enc").unlink()
        ring = _keyring()
        if ring is not None and ring.get_password(SERVICE, f"history-{self.stack}") is not None:
            ring.delete_password(SERVICE, f"history-{self.stack}")
        self._key_file().unlink(missing_ok=True)
        return len(ids)


def export(conversation: Conversation, fmt: str) -> str:
    """The conversation as Markdown (for people) or JSON (for programs)."""
    if fmt == "json":
        return json.dumps(vars(conversation), indent=2) + "\n"
    if fmt != "markdown":
        raise HistoryError(f"unknown export format {fmt!r}: markdown or json")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(conversation.started_at))
    parts = [f"# Chat with {conversation.model}\n\n_{when}_\n"]
    for m in conversation.messages:
        content = m["content"] if isinstance(m["content"], str) else " ".join(
            p.get("text", "[image]") for p in m["content"]
        )  # fmt: skip
        parts.append(f"\n## {m['role'].capitalize()}\n\n{content}\n")
    return "".join(parts)
