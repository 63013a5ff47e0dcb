"""Chat history: unreadable without the stack's key, readable with it; exports; purge."""

from __future__ import annotations

import json
import os
import stat

import pytest

from gpu_session.chat.history import Conversation, History, HistoryError, export


@pytest.fixture
def history(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return History("dev")


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "The launch code is 0000-canary"},
    {"role": "assistant", "content": "Noted."},
]


def test_history_is_unreadable_without_the_key_and_readable_with_it(history, tmp_path):
    from cryptography.fernet import Fernet, InvalidToken

    path = history.save(Conversation("gpu-session/tiny-chat", CONVERSATION, started_at=1_800_000_000))
    raw = path.read_bytes()
    assert b"canary" not in raw and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(InvalidToken):
        Fernet(Fernet.generate_key()).decrypt(raw)  # another key: noise
    assert Fernet(history.key()).decrypt(raw)  # this stack's key (no OS keyring here: a 0600 file)
    assert stat.S_IMODE(os.stat(tmp_path / "config" / "gpu-session" / "history-keys" / "dev.key").st_mode) == 0o600
    loaded = history.load(path.stem)
    assert loaded.messages == CONVERSATION and loaded.model == "gpu-session/tiny-chat" and history.ids() == [path.stem]


def test_exports(history):
    conversation = Conversation("m/x", CONVERSATION, started_at=1_800_000_000)
    assert json.loads(export(conversation, "json"))["messages"] == CONVERSATION
    markdown = export(conversation, "markdown")
    assert markdown.startswith("# Chat with m/x\n") and "## User\n\nThe launch code is 0000-canary\n" in markdown
    assert markdown.index("## System") < markdown.index("## User") < markdown.index("## Assistant")
    with pytest.raises(HistoryError, match="markdown or json"):
        export(conversation, "pdf")


def test_purge_deletes_conversations_and_key(history):
    history.save(Conversation("m/x", CONVERSATION, id="a"))
    history.save(Conversation("m/x", CONVERSATION, id="b"))
    assert history.purge() == 2 and history.ids() == [] and history.key() is None
    with pytest.raises(HistoryError, match="no conversation"):
        history.load("a")


def test_an_id_is_never_a_path(history):
    history.save(Conversation("m/x", CONVERSATION, id="a"))
    with pytest.raises(HistoryError, match="no conversation"):
        history.load("../../../etc/passwd")
    assert history.load("../a").id == "a"  # only the name counts: nothing outside the history folder
