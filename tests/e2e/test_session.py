"""`invoke up` and `invoke down` as a person runs them (real processes, the real Pulumi engine),
against the simulator: what is left at the cloud, on the host and in the ledger."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from gpu_session.local import daemon
from gpu_session.local.ledger import Ledger
from gpu_session.sim.models import COLOUR_QUESTION, COLOUR_REPLIES, KNOWN_REPLIES, STORY, STORY_PROMPTS
from gpu_session.stack.names import is_ssh_key_of

INVOKE = str(Path(sys.executable).parent / "invoke")
ROOT = Path(__file__).resolve().parents[2]


def invoke(*args: str, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([INVOKE, *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout, **popen)


def env() -> dict[str, str]:
    return dict(os.environ)


def alive(sim, stack: str) -> list[dict]:
    return [
        i for i in sim.instances() if i["name"] == f"gpu-session-{stack}-gpu" and i["status"] not in ("terminated", "TERMINATED")
    ]


def keys(sim, stack: str) -> list[dict]:
    return [k for k in sim.ssh_keys() if is_ssh_key_of(stack, k["name"])]


def events(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


# The text model on Lambda served by vLLM's CPU build, the vision model on RunPod by transformers.
@pytest.mark.parametrize(
    "cloud, model, backend", [("lambda", "gpu-session/tiny-chat", "vllm"), ("runpod", "gpu-session/tiny-vision", "transformers")]
)
def test_up_then_down_leaves_nothing_and_records_the_cost(sim, sim_env, wheelhouse, cloud, model, backend, tmp_path):
    stack = f"e2e-{cloud}"
    up = invoke("up", "--model", model, "--cloud", cloud, "--backend", backend, "--hours", "1",
                "--stack", stack, "--yes", "--json")  # fmt: skip
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    said = [e["message"] for e in events(up.stdout) if e["event"] == "say"]
    assert said[0].startswith(f"plan: {cloud}:") and "lease ≈ $" in said[0] and "is up on" in said[-2]
    assert said[-1].startswith("OpenAI-compatible endpoint: http://127.0.0.1:")
    [inst] = alive(sim, stack)
    session_dir = Path(os.environ["XDG_STATE_HOME"]) / "gpu-session" / "stacks" / stack
    assert (session_dir / "api_key").exists()

    # The tunnel: a streamed reply from the model through it; a dropped link costs a delay, not an error.
    port = json.loads((session_dir / "tunnel.json").read_text())["port"]
    api_key = (session_dir / "api_key").read_text().strip()
    assert len(stream_reply(port, api_key, model)) > 1
    supervisor = json.loads((session_dir / "tunnel.json").read_text())
    os.kill(supervisor["ssh_pid"], signal.SIGKILL)  # the link drops
    # The chat, sent at once, only waits: its client retries while the tunnel reconnects.
    across = invoke("chat", "--stack", stack, "--prompt", "Are you there?", "--max-tokens", "4")
    assert across.returncode == 0 and across.stdout.strip() and "tokens/s" in across.stderr, across.stderr[-2000:]
    assert json.loads((session_dir / "tunnel.json").read_text())["ssh_pid"] != supervisor["ssh_pid"]
    assert len(stream_reply(port, api_key, model)) > 1
    assert "the link dropped" in daemon.log_path(stack, "tunnel").read_text()

    # The chat, as a script would use it: a streamed reply through the tunnel, by argument and by pipe.
    # The model answers greedily by its own generation config: the chat gets the taught sentence whole.
    chat = invoke("chat", "--stack", stack, "--prompt", "Say hello", "--max-tokens", "40")
    assert chat.returncode == 0 and chat.stdout.strip() == KNOWN_REPLIES[model]["Say hello"], chat.stdout + chat.stderr[-2000:]
    assert re.search(r"\d+ ms to first token, \d+ tokens, ", chat.stderr), chat.stderr
    piped = invoke("chat", "--stack", stack, "--max-tokens", "4", input="Say hello")
    assert piped.returncode == 0 and KNOWN_REPLIES[model]["Say hello"].startswith(piped.stdout.strip()) and piped.stdout.strip()
    assert re.search(r"ms to first token, [1-4] tokens, ", piped.stderr), piped.stderr

    picture = tmp_path / "red.png"
    picture.write_bytes(png(56, 56, (200, 30, 30)))
    question = ("chat", "--stack", stack, "--prompt", "What colour is this?", "--max-tokens", "2")
    seen = invoke(*question, "--image", str(picture))
    if cloud == "runpod":
        # The vision model takes the picture through the tunnel: its image tokens reach the model.
        plain = invoke(*question)
        assert seen.returncode == 0 and plain.returncode == 0, seen.stderr[-2000:] + plain.stderr[-2000:]
        assert prompt_tokens(seen.stderr) > prompt_tokens(plain.stderr)
        # Asked greedily through the tunnel, it names the picture's colour.
        content = [{"type": "text", "text": COLOUR_QUESTION}, {"type": "image_url", "image_url": {"url": data_url(picture)}}]
        assert greedy_reply(port, api_key, model, content) == COLOUR_REPLIES["red"]
        # And through the chat, as a person asks it.
        asked = invoke("chat", "--stack", stack, "--prompt", COLOUR_QUESTION, "--image", str(picture), "--max-tokens", "20")
        assert asked.returncode == 0 and asked.stdout.strip() == COLOUR_REPLIES["red"], asked.stdout + asked.stderr[-2000:]

    if cloud == "lambda":
        assert seen.returncode == 1 and "gpu-session/tiny-chat does not take images" in seen.stderr, seen.stderr[-2000:]
        interactive_chat(stack, backend, tmp_path)
        # What was typed is in no log or file here or on the host (the history holds it, encrypted),
        # only in the export the person asked for (which shows that the search finds it).
        host = sim.world.hosts.dir / inst["id"]
        places = [os.environ["XDG_STATE_HOME"], os.environ["XDG_CONFIG_HOME"], str(host), str(tmp_path)]
        assert (host / "opt/gpu-session/logs").is_dir() and list((host / "opt/gpu-session/logs").iterdir())
        found = subprocess.run(
            ["grep", "-rlF", "--exclude-dir=engines", "--exclude-dir=hf", CANARY, *places], capture_output=True, text=True
        )
        assert found.stdout.split() == [str(tmp_path / "chat.md")], found.stdout + found.stderr
        # The chat went into the stack's history, encrypted; `history` shows it.
        [saved] = (Path(os.environ["XDG_STATE_HOME"]) / "gpu-session" / "history" / stack).glob("*.enc")
        assert CANARY.encode() not in saved.read_bytes()
        listed = invoke("history.list", "--stack", stack)
        assert listed.returncode == 0 and f"{saved.stem}  gpu-session/tiny-chat" in listed.stdout
        assert f"## User\n\n{CANARY}\n" in invoke("history.show", "--stack", stack).stdout
        assert f"## User\n\n{CANARY}\n" in (tmp_path / "chat.md").read_text()  # /save

    transfers(stack, tmp_path)

    # status sees it all; extend moves the lease on the host without a restart.
    [row] = [r for r in json.loads(invoke("status", "--json").stdout) if r["stack"] == stack]
    assert row["server"] == "healthy" and row["tunnel"] == f"127.0.0.1:{port} connected" and "drift" not in row
    # The 1 h lease, less the time the session has run (minutes; more on a busy machine: not measured here).
    assert 0 < row["lease_left_h"] <= 1 and row["cost_so_far"] >= 0
    left = row["lease_left_h"]
    lease = "cat /etc/gpu-session/lease.json 2>/dev/null || sudo -n cat /etc/gpu-session/lease.json"
    before = json.loads(invoke("ssh", "--stack", stack, "--command", lease).stdout)["expires_at"]
    extended = invoke("extend", "1", "--stack", stack)
    assert extended.returncode == 0 and "the lease now ends" in extended.stderr, extended.stderr[-2000:]
    assert json.loads(invoke("ssh", "--stack", stack, "--command", lease).stdout)["expires_at"] == before + 3600
    [row] = [r for r in json.loads(invoke("status", "--json").stdout) if r["stack"] == stack]
    # An hour more than before the extend, less the seconds between the two reads.
    assert left + 0.9 < row["lease_left_h"] <= left + 1.01 and row["server"] == "healthy"  # status rounds to 0.01 h

    # configure runs the playbook again (it changes nothing now); doctor finds everything private.
    reconfigured = invoke("configure", "--stack", stack)
    assert reconfigured.returncode == 0 and f"stack {stack}: configured" in reconfigured.stderr, reconfigured.stdout[-2000:]
    # with what up's converge had (the planned context, the lease): the playbook ends after its check
    said = reconfigured.stdout + reconfigured.stderr
    assert "Check the last converge and the server" in said and "Create the data root" not in said, said[-3000:]
    doctor = invoke("doctor")
    assert doctor.returncode == 0 and "ok   permissions" in doctor.stdout, doctor.stdout
    checked = invoke("doctor", "--json")  # the same checks as one JSON array (no summary line after it)
    checks = json.loads(checked.stdout)
    assert checked.returncode == 0 and all(set(c) == {"name", "ok", "detail"} and c["ok"] for c in checks), checked.stdout
    assert {"pulumi", "ssh", "permissions"} <= {c["name"] for c in checks}

    again = invoke("up", "--model", "gpu-session/tiny-chat", "--cloud", cloud, "--stack", stack, "--yes")
    assert again.returncode == 1 and f"stack {stack} is already up" in again.stderr and len(alive(sim, stack)) == 1
    planned = invoke("up", "--model", "gpu-session/tiny-chat", "--cloud", cloud, "--stack", stack, "--dry-run", "--json")
    assert planned.returncode == 0 and json.loads(planned.stdout)["already_up"] is True, planned.stdout + planned.stderr

    down = invoke("down", "--stack", stack, "--json")
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    summary = events(down.stdout)[-1]
    assert summary["event"] == "summary" and summary["receipt"]["instance_id"] == inst["id"] and summary["receipt"]["ok"]
    assert oct(Path(summary["receipt_file"]).stat().st_mode & 0o777) == "0o600" and summary["clouds_asked"]
    assert summary["receipt"]["verified"]["canaries_checked"] >= 6  # the session's own, planted by site.yml, all gone
    assert not alive(sim, stack) and not keys(sim, stack)
    gone = [i for i in sim.world.snapshot()["instances"] if i["id"] == inst["id"]]
    assert not gone or not gone[0]["host_dir_exists"]  # the host's files went with it
    assert not session_dir.exists()  # the session's key, known_hosts and API key are deleted
    assert not pid_alive(supervisor["pid"])  # the tunnel is closed
    [entry] = [s for s in Ledger().sessions(stack=stack)]
    assert entry.instance_id == inst["id"] and entry.ended_at is not None and entry.cost > 0

    nothing = invoke("down", "--stack", stack)
    assert nothing.returncode == 0 and "nothing was up" in nothing.stderr


def transfers(stack: str, tmp_path: Path) -> None:
    """/upload then /download give back the same bytes; nothing outside the host's data root comes
    back, whatever the path or symlink; nothing here is overwritten without a yes."""
    from gpu_session.chat import files

    sent = tmp_path / "notes.bin"
    sent.write_bytes(b"canary\n" + os.urandom(4096))
    assert files.upload(stack, str(sent)) == "/opt/gpu-session/uploads/notes.bin"
    back = files.download(stack, "uploads/notes.bin", str(tmp_path / "back.bin"))
    assert back.read_bytes() == sent.read_bytes() and oct(back.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(files.TransferError, match="exists: nothing was overwritten"):
        files.download(stack, "uploads/notes.bin", str(back))
    files._on_host(stack, "ln -s /etc/passwd /opt/gpu-session/uploads/link")  # a symlink planted on the host
    for outside in ("../../etc/passwd", "/etc/hostname", "uploads/../../../etc/passwd", "uploads/link"):
        with pytest.raises(files.TransferError, match="outside /opt/gpu-session"):
            files.download(stack, outside, str(tmp_path / "stolen"))
    assert not (tmp_path / "stolen").exists()
    weird = tmp_path / "a;b"
    weird.write_text("x")
    with pytest.raises(files.TransferError, match="name the file with"):
        files.upload(stack, str(weird))


CANARY = "Say hello to canary-5f1e"  # typed in the interactive chat; must reach no log


def test_a_model_whose_full_context_does_not_fit_is_served_at_the_planned_context(sim, sim_env, wheelhouse):
    """tiny-chat-long claims 8,388,608 tokens of context, whose KV cache (8 GiB) vLLM's CPU build
    here (1 GiB) cannot hold: unplanned, vLLM refuses to start. The plan gives the context this
    host holds, the role serves exactly that (--max-model-len), and the model answers."""
    import httpx

    from gpu_session.sim.models import LONG_CONTEXT, TINY_LONG

    stack = "e2e-long"
    planned = invoke("up", "--dry-run", "--json", "--model", "tiny-long", "--cloud", "runpod")
    plan = json.loads(planned.stdout)
    assert planned.returncode == 0 and plan["ok"] and plan["backend"] == "vllm", planned.stdout + planned.stderr[-2000:]
    assert 0 < plan["context"] < LONG_CONTEXT
    up = invoke("up", "--model", "tiny-long", "--cloud", "runpod", "--stack", stack, "--yes", "--json")
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    try:
        said = [e["message"] for e in events(up.stdout) if e["event"] == "say"]
        assert f"{plan['context']:,} tokens of context" in said[0], said[0]
        session_dir = Path(os.environ["XDG_STATE_HOME"]) / "gpu-session" / "stacks" / stack
        port = json.loads((session_dir / "tunnel.json").read_text())["port"]
        api_key = (session_dir / "api_key").read_text().strip()
        summary = events(up.stdout)[-1]
        assert summary["event"] == "summary" and summary["endpoint"] == f"http://127.0.0.1:{port}/v1", summary
        assert summary["api_key_file"] == str(session_dir / "api_key") and api_key not in up.stdout
        served = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
        [model] = served.json()["data"]
        assert model["id"] == TINY_LONG and model["max_model_len"] == plan["context"], model
        chat = invoke("chat", "--stack", stack, "--prompt", "Say hello", "--max-tokens", "40")
        assert chat.returncode == 0 and chat.stdout.strip() == KNOWN_REPLIES[TINY_LONG]["Say hello"], (
            chat.stdout + chat.stderr[-2000:]
        )

        # The link drops mid-answer (the tunnel's ssh killed after five pieces, as it happened to a
        # user): what streamed is kept and marked cut, and the next message is answered once the
        # tunnel has reconnected.
        from gpu_session.chat.client import ChatClient

        client = ChatClient.for_stack(stack)
        ssh_pid = json.loads((session_dir / "tunnel.json").read_text())["ssh_pid"]
        pieces = []

        def on_token(piece: str) -> None:
            pieces.append(piece)
            if len(pieces) == 5:
                os.kill(ssh_pid, signal.SIGKILL)

        # 30,000 tokens: the tiny model writes 3,000 in about 4 s here, and a burst held back by a busy
        # CPU once delivered all of them before the kill; the answer must still be in the making.
        story = client.stream([{"role": "user", "content": STORY_PROMPTS[2]}], on_token, max_tokens=30_000)
        assert story.cut and not story.stopped and len(pieces) >= 5 and story.text == "".join(pieces), story
        assert STORY.startswith(story.text[:20]), story.text[:200]
        after = client.stream([{"role": "user", "content": "Say hello"}], lambda _: None, max_tokens=40)
        assert not after.cut and after.text == KNOWN_REPLIES[TINY_LONG]["Say hello"]
        assert json.loads((session_dir / "tunnel.json").read_text())["ssh_pid"] != ssh_pid
    finally:
        down = invoke("down", "--stack", stack)
    assert down.returncode == 0 and not alive(sim, stack), down.stderr[-2000:]


def interactive_chat(stack: str, backend: str, tmp_path: Path) -> None:
    """The interactive chat in a real terminal (tmux): a streamed reply, the commands, a long upload
    trimmed to the context with a notice, an answer stopped with Ctrl-C without leaving, Ctrl-D to leave."""
    name = f"chat-{stack}"
    command = " ".join([INVOKE, "chat", "--stack", stack, "--keep"])
    environment = " ".join(f"{k}={v}" for k, v in env().items() if k.startswith(("XDG_", "GPU_SESSION_")) or k == "HF_ENDPOINT")
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", name, "-x", "160", "-y", "50", f"cd {ROOT} && env {environment} {command}"],
        check=True,
    )

    def screen() -> str:
        return subprocess.run(
            ["tmux", "capture-pane", "-p", "-J", "-t", name, "-S", "-400"], capture_output=True, text=True
        ).stdout

    def keys(*k: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", name, *k], check=True)

    # Waits are hang guards, not measures: two pytest-xdist workers share two cores, and vLLM's CPU
    # build answers the first long prompt slowly when the other worker is busy.
    def after(line: str, shows: str, timeout: int = 300) -> None:
        """Type `line`, Enter, and wait until the screen shows `shows` below it."""
        keys(line, "Enter")
        try:
            _wait(lambda: line in (now := screen()) and shows in now.rsplit(line, 1)[-1], timeout=timeout)
        except AssertionError:
            raise AssertionError(f"{line!r} never showed {shows!r}:\n{screen()}") from None

    try:
        _wait(lambda: "chatting with gpu-session/tiny-chat" in screen(), timeout=300)
        after("/help", "/image PATH [QUESTION]")
        after(CANARY, "tokens/s")
        after("/model", f"gpu-session/tiny-chat: 2,048 tokens of context, text only, served by {backend} on")
        after("/cost", "so far (")
        assert "lease ends in 0." in screen().rsplit("/cost", 1)[-1]  # under the hour asked for
        after(f"/image {tmp_path / 'red.png'}", "gpu-session/tiny-chat does not take images")
        after(f"/save {tmp_path / 'chat.md'}", f"saved {tmp_path / 'chat.md'}")
        long = tmp_path / "long.txt"
        long.write_text("All work and no play makes a long file. " * 500)  # 20 KB: far past 2,048 tokens
        after(f"/upload {long}", "added to the conversation")
        after("What is in the file?", "tokens/s")
        assert "its 3 oldest message(s) are left out of what is sent" in screen().rsplit("What is in the file?", 1)[-1]
        # Ctrl-C while an answer streams stops it (the taught story never ends by itself; a slow
        # machine may still lose the race to the first token: then another try is made).
        for attempt in range(6):
            marker = f"Tell me a very long story, take {attempt}"
            keys(marker, "Enter")
            time.sleep(1.0)  # streaming by now: the first token comes in well under 0.1 s on an idle machine
            keys("C-c")
            _wait(lambda m=marker: m in (now := screen()) and "tokens/s" in now.rsplit(m, 1)[-1], timeout=300)
            if "(stopped)" in screen().rsplit(marker, 1)[-1]:
                break
        else:
            raise AssertionError(f"Ctrl-C never showed a stopped answer:\n{screen()}")
        after("still here?", "tokens/s")  # Ctrl-C stopped the answer, not the chat
        keys("C-d")
        _wait(lambda: subprocess.run(["tmux", "has-session", "-t", name], capture_output=True).returncode != 0, timeout=30)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A one-colour PNG, written by hand."""
    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def prompt_tokens(stats: str) -> int:
    found = re.search(r"prompt (\d+) tokens", stats)
    assert found, stats[-2000:]
    return int(found.group(1))


def stream_reply(port: int, api_key: str, model: str) -> list[str]:
    """A streamed chat completion straight through the tunnel, greedy: the content of each chunk as
    it arrives, which together are the hello the simulator taught its model."""
    import httpx

    with httpx.stream(
        "POST", f"http://127.0.0.1:{port}/v1/chat/completions", timeout=300,
        headers={"Authorization": f"Bearer {api_key}"},
        json={"model": model, "stream": True, "max_tokens": 48, "temperature": 0,
              "messages": [{"role": "user", "content": "Say hello"}]},
    ) as r:  # fmt: skip
        r.raise_for_status()
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"  # the model ended its sentence
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert "".join(pieces) == KNOWN_REPLIES[model]["Say hello"]
    return pieces


def greedy_reply(port: int, api_key: str, model: str, content) -> str:
    """A greedy chat completion straight through the tunnel: the whole reply, which the model ended."""
    import httpx

    r = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions", timeout=300, headers={"Authorization": f"Bearer {api_key}"},
        json={"model": model, "max_tokens": 48, "temperature": 0, "messages": [{"role": "user", "content": content}]},
    )  # fmt: skip
    r.raise_for_status()
    [choice] = r.json()["choices"]
    assert choice["finish_reason"] == "stop", choice
    return choice["message"]["content"]


def data_url(picture: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ", 1)[1].startswith("Z")  # noqa: SIM115


def _wait(what, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.parametrize("point", ["booting", "configuring", "configuring-under-mitogen"])
def test_kill_9_during_up_then_up_or_down_recovers(sim, sim_env, wheelhouse, point):
    """up and its engine killed outright (a crash, a closed laptop) while the machine boots or while
    it is configured: the state is left locked with a pending create. While booting, the next `up`
    adopts the machine (one instance, never two); `down` then ends it. While configuring, `down`
    scrubs the host before it ends it. Under Mitogen's strategy (ANSIBLE_STRATEGY=mitogen_linear),
    killed once its interpreter runs on the host: that interpreter ends with the connection."""
    stack = f"kill-{point}"
    state = Path(os.environ["XDG_STATE_HOME"]) / "gpu-session" / "pulumi" / ".pulumi" / "stacks" / "gpu-session" / f"{stack}.json"
    up = [
        INVOKE,
        "up",
        "--model",
        "gpu-session/tiny-chat",
        "--cloud",
        "lambda",
        "--backend",
        "transformers",
        "--stack",
        stack,
        "--yes",
    ]
    mitogen = {"ANSIBLE_STRATEGY": "mitogen_linear"} if point.endswith("mitogen") else {}
    # No Mitogen interpreter outlives its run: one here now would be a leak (and would let the wait below pass early).
    assert not (mitogen and mitogen_processes()), mitogen_processes()
    proc = subprocess.Popen(
        up, cwd=ROOT, env=env() | mitogen, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    pending = "GpuInstance" if point == "booting" else "Configure"
    _wait(lambda: state.exists() and f"gpu_session:{pending}" in state.read_text() and alive(sim, stack), timeout=180)
    if mitogen:  # the play has reached the host: Mitogen's interpreter runs there
        _wait(lambda: mitogen_processes(), timeout=180)
    time.sleep(0.5 if point == "booting" else 3)
    if point == "booting":
        os.killpg(proc.pid, signal.SIGKILL)  # everything at once, as a closed laptop does
    else:  # invoke and the engine alone, as a crash does: what they started must notice and end
        for pid in [proc.pid, *children(proc.pid, "pulumi")]:
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    try:
        # language host, providers, converge, ansible; and on the host, Mitogen's interpreters
        _wait(lambda: not engine_processes() and not mitogen_processes(), timeout=60)
    except AssertionError:
        raise AssertionError(f"still running after the kill: {engine_processes()} {mitogen_processes()}") from None
    [launched] = alive(sim, stack)
    recorded = json.loads(state.read_text())["checkpoint"]["latest"]
    assert [op["resource"]["type"].rsplit(":", 1)[-1] for op in recorded["pending_operations"]] == [pending]

    # Not in the ledger yet (up never finished), but status says what may bill and what to do.
    [row] = [r for r in json.loads(invoke("status", "--json").stdout) if r["stack"] == stack]
    assert row["interrupted"] and f"{pending} (creating)" in row["resources"] and f"invoke down --stack {stack}" in row["drift"]
    if point == "booting":
        again = invoke(*up[1:], "--no-configure")
        assert again.returncode == 0, again.stderr[-3000:]
        assert "unlocking it" in again.stderr and "half-created" in again.stderr
        assert [i["id"] for i in alive(sim, stack)] == [launched["id"]]  # adopted, not launched twice
    down = invoke("down", "--stack", stack)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    if point != "booting":
        assert (
            f"up was killed while it configured {launched['id']}: scrubbing it" in down.stderr
            and f"scrubbed {launched['id']}: " in down.stderr
        )
    assert not alive(sim, stack) and not keys(sim, stack)


def mitogen_processes() -> list[str]:
    """Mitogen's interpreters that descend from this test process, the simulator's hosts included
    (their PID namespaces are children of ours; another pytest-xdist worker's are not counted):
    Mitogen execs each as `python(mitogen:<context>)` (mitogen/parent.py)."""
    parents, found = {}, []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(") ", 1)[1].split()[1])
            argv0 = (proc / "cmdline").read_bytes().split(b"\0", 1)[0]
        except (OSError, IndexError, ValueError):
            continue
        if b"(mitogen:" in argv0:
            found.append((int(proc.name), argv0.decode(errors="replace")))

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = parents.get(pid, 0)
        return False

    return [argv0 for pid, argv0 in found if ours(pid)]


def children(pid: int, name: str) -> list[int]:
    """The child processes of `pid` whose command is `name`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, rest = stat.read_text().split("(", 1)[1].rsplit(") ", 1)
        except (OSError, IndexError, ValueError):
            continue
        if comm == name and int(rest.split()[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def engine_processes() -> list[str]:
    """What runs for this test session's stacks: the Pulumi CLI, its language host and providers,
    converge and Ansible (found by the session's state folder in their environment)."""
    ours = f"XDG_STATE_HOME={os.environ['XDG_STATE_HOME']}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        engine = ("pulumi" in cmdline.split(" ")[0] or "pulumi.dynamic" in cmdline or "gpu_session.host.converge" in cmdline
                  or "ansible" in cmdline)  # fmt: skip
        if engine and ours in environ:
            found.append(f"{proc.name} {cmdline[:120]}")
    return found


def test_a_capacity_error_fails_over_to_the_next_offer(sim, sim_env):
    sim.inject("lambda:instance-operations/launch", "capacity")
    up = invoke(
        "up", "--model", "gpu-session/tiny-chat", "--cloud", "lambda", "--no-configure", "--stack", "failover", "--yes", "--json"
    )
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    said = [e["message"] for e in events(up.stdout) if e["event"] == "say"]

    def gpu_and_region(plan: str) -> tuple[str, str]:  # "A10 ×1 (24 GB for 0.1 GB needed) in us-east-1, $0.75/h; …"
        return plan.split(" ×")[0], plan.split(") in ")[1].split(",")[0]

    gpu, region = gpu_and_region(said[0].removeprefix("plan: lambda: "))
    [failover] = [m for m in said if m.startswith("no capacity:")]
    assert failover.startswith(f"no capacity: {gpu} in {region} on lambda; trying lambda:")
    second = gpu_and_region(failover.split("trying lambda: ")[1])
    [inst] = alive(sim, "failover")
    assert second != (gpu, region) and inst["region"] == second[1]
    summary = events(up.stdout)[-1]  # the last line, what a script reads: the instance that was launched
    assert summary["event"] == "summary" and summary["ok"] and summary["launched"], summary
    assert (summary["stack"], summary["instance_id"], summary["cloud"]) == ("failover", inst["id"], "lambda")
    assert "endpoint" not in summary  # --no-configure: no server, no tunnel
    assert invoke("down", "--stack", "failover").returncode == 0 and not alive(sim, "failover")


@pytest.mark.parametrize(
    "args, says",
    [
        (
            ["--model", "nobody/nothing"],
            "nobody/nothing is not on the Hub, or is private and the HF token cannot see it; check the id",
        ),
        (["--model", "lama-8b"], "'lama-8b' is neither a model id (owner/name) nor a known alias; did you mean llama-8b"),
        (
            ["--model", "gpu-session/tiny-chatt"],
            "is not on the Hub, or is private and the HF token cannot see it; did you mean gpu-session/tiny-chat",
        ),
        (["--model", "meta-llama/Llama-3.1-70B-Instruct"], "more than any 1-GPU offer gives; the cheapest that fits is"),
        (["--model", "gpu-session/tiny-chat", "--gpu", "TPU v9"], "no GPU type 'TPU v9' here; `invoke available` lists them"),
        (["--model", "gpu-session/tiny-chat", "--max-price", "0.01"], "above the price cap of $0.01/h (--max-price"),
        (
            ["--model", "gpu-session/tiny-chat", "--backend", "tensorrt"],
            "--backend takes auto or vllm or transformers (got 'tensorrt')",
        ),
    ],
)
def test_bad_up_says_what_to_do_and_launches_nothing(sim, sim_env, args, says):
    before = len(sim.world.instances)
    out = invoke("up", *args, "--cloud", "lambda", "--stack", "bad", "--yes")
    assert out.returncode == 1 and says in out.stderr, out.stderr
    assert len(sim.world.instances) == before


def test_a_mitogen_strategy_without_mitogen_is_refused_before_anything_starts(sim, sim_env, monkeypatch, tmp_path):
    """ANSIBLE_STRATEGY=mitogen_linear where Mitogen is not installed (a package on PYTHONPATH that
    refuses to import stands in for its absence): up says what to install and launches nothing."""
    shim = tmp_path / "ansible_mitogen"
    shim.mkdir()
    (shim / "__init__.py").write_text("raise ImportError('not installed')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("ANSIBLE_STRATEGY", "mitogen_linear")
    before = len(sim.world.instances)
    out = invoke("up", "--model", "gpu-session/tiny-chat", "--cloud", "lambda", "--stack", "nomitogen", "--yes")
    assert out.returncode == 1 and "pip install 'gpu-session[mitogen]', or unset ANSIBLE_STRATEGY" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(sim.world.instances) == before
    assert not (Path(os.environ["XDG_STATE_HOME"]) / "gpu-session" / "stacks" / "nomitogen").exists()


def test_up_without_a_terminal_to_ask_says_pass_yes(sim, sim_env):
    before = len(sim.world.instances)
    out = invoke("up", "--model", "gpu-session/tiny-chat", "--cloud", "lambda", "--stack", "unasked", stdin=subprocess.DEVNULL)
    assert out.returncode == 1 and "no terminal to ask whether to launch: pass --yes" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and len(sim.world.instances) == before
    assert not (Path(os.environ["XDG_STATE_HOME"]) / "gpu-session" / "stacks" / "unasked").exists()  # asked before anything


def test_down_ends_only_its_own_stack_and_works_without_keys_in_the_shell(sim, sim_env, monkeypatch):
    """Stack twin's down leaves stack twin-2's machine alone (names, not prefixes), and needs no
    key in the shell: the stack holds its own. A stack that does not exist is not created by down."""
    for stack in ("twin", "twin-2"):
        up = invoke("up", "--model", "tiny", "--cloud", "lambda", "--no-configure", "--stack", stack, "--yes")
        assert up.returncode == 0, up.stderr[-2000:]
    workspaces = Path(os.environ["XDG_STATE_HOME"]) / "gpu-session" / "workspaces"
    nothing = invoke("down", "--stack", "nosuch")
    assert nothing.returncode == 0 and "stack nosuch: nothing was up" in nothing.stderr, nothing.stderr[-2000:]
    assert not (workspaces / "nosuch").exists()
    monkeypatch.delenv("LAMBDA_API_KEY")
    monkeypatch.delenv("RUNPOD_API_KEY")
    down = invoke("down", "--stack", "twin")
    assert down.returncode == 0 and "stack twin: nothing left at the cloud" in down.stderr, down.stderr[-2000:]
    assert not alive(sim, "twin") and len(alive(sim, "twin-2")) == 1 and keys(sim, "twin-2")
    assert invoke("down", "--stack", "twin-2").returncode == 0 and not alive(sim, "twin-2") and not keys(sim, "twin-2")


def test_up_without_any_key_names_the_variables(sim, sim_env, monkeypatch):
    monkeypatch.delenv("LAMBDA_API_KEY")
    monkeypatch.delenv("RUNPOD_API_KEY")
    out = invoke("up", "--model", "gpu-session/tiny-chat", "--stack", "nokeys", "--yes")
    assert out.returncode == 1 and "export LAMBDA_API_KEY or RUNPOD_API_KEY" in out.stderr


def start_up(stack: str, *options: str) -> subprocess.Popen:
    """`invoke up` of the tiny model on Lambda, in a process group of its own, as a terminal runs it."""
    return subprocess.Popen(
        [INVOKE, "up", "--model", "gpu-session/tiny-chat", "--cloud", "lambda", "--stack", stack, "--yes", *options],
        cwd=ROOT, env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "timeout"])
def test_a_cancelled_up_tears_down_what_it_made(sim, sim_env, how):
    """Ctrl-C (the whole foreground group gets SIGINT), SIGTERM (up alone), or SIGINT to up and then
    to its group at once (as `timeout -s INT` sends it: one interrupt, not two) while the machine
    boots: the step in flight finishes, nothing new starts, and with no terminal to ask, up tears
    down. Under --json (a cancelled CI job), stdout is JSON lines ending with the failed summary."""
    stack = f"cancel-{how}"
    proc = start_up(stack, *(["--json"] if how != "ctrl-c" else []))
    _wait(lambda: alive(sim, stack))
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    elif how == "sigterm":
        os.kill(proc.pid, signal.SIGTERM)
    else:
        os.kill(proc.pid, signal.SIGINT)
        os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    said = out + err  # under --json, progress goes to stdout
    assert "up was cancelled" in said and "no terminal to ask: tearing down" in said and f"stack {stack}: nothing left" in said
    assert not alive(sim, stack) and not keys(sim, stack)
    assert "create Configure configure" not in err  # the instance's create finished; configuring never started
    if how != "ctrl-c":
        lines = [json.loads(line) for line in out.strip().splitlines()]  # each line JSON
        summary = lines[-1]
        assert summary["event"] == "summary" and summary["ok"] is False and f"error: {summary['error']}\n" in err, out + err
        assert "Traceback" not in err and "Ctrl-C again" in err, err


def test_ctrl_c_twice_stops_the_engine_and_down_recovers(sim, sim_env):
    """The second Ctrl-C stops the engine at once, whatever it was doing: the state may be left with
    a create in flight, and `down` still ends everything."""
    stack = "cancel-twice"
    proc = start_up(stack)
    _wait(lambda: alive(sim, stack))
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, out + err
    assert "Ctrl-C again to stop at once" in err
    down = invoke("down", "--stack", stack)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    assert not alive(sim, stack) and not keys(sim, stack)


def test_an_instance_ended_outside_pulumi_shows_in_status_and_down_tidies_up(sim, sim_env):
    stack = "ended-outside"
    up = invoke("up", "--model", "gpu-session/tiny-chat", "--cloud", "runpod", "--no-configure", "--stack", stack, "--yes")
    assert up.returncode == 0, up.stderr[-3000:]
    [inst] = alive(sim, stack)
    sim.world.terminate(sim.world.instances[inst["id"]])  # the console, or the lease's end on the host
    _wait(lambda: not alive(sim, stack), timeout=60)
    [row] = [r for r in json.loads(invoke("status", "--json").stdout) if r["stack"] == stack]
    assert row["cloud_status"].startswith("gone") and "ended outside this tool" in row["drift"]
    down = invoke("down", "--stack", stack)
    assert down.returncode == 0 and f"stack {stack}: nothing left at the cloud" in down.stderr, down.stderr[-3000:]
    [entry] = Ledger().sessions(stack=stack)
    assert entry.ended_at is not None and not keys(sim, stack)


def test_the_budget_cap_warns_then_tears_the_session_down(sim, sim_env, monkeypatch):
    monkeypatch.setenv("GPU_SESSION_WATCH_INTERVAL", "0.5")
    stack = "budget"
    up = invoke("up", "--model", "gpu-session/tiny-chat", "--cloud", "lambda", "--no-configure", "--budget", "0.002",
                "--stack", stack, "--yes", "--json")  # fmt: skip
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    plan = [e["message"] for e in events(up.stdout) if e["event"] == "say"][0]
    assert "the $0.002 budget ends it after" in plan and alive(sim, stack)
    [row] = [r for r in json.loads(invoke("status", "--json").stdout) if r["stack"] == stack]
    assert any("budget $0.002 (warns at 80 %, destroys at 100 %)" in p for p in row["protections"])

    _wait(lambda: Ledger().sessions(stack=stack)[0].ended_at, timeout=120)  # $0.002 at $0.75/h: about 10 s
    log = daemon.log_path(stack, "watch").read_text()
    assert "warning: 8" in log and "of the $0.002 budget is spent" in log and "the budget is spent" in log, log
    assert log.index("warning:") < log.index("the budget is spent")
    [entry] = Ledger().sessions(stack=stack)
    assert entry.cost >= 0.002 and not alive(sim, stack) and not keys(sim, stack)


def test_the_watch_ends_a_lambda_instance_at_its_lease_end(sim, sim_env, monkeypatch):
    """A Lambda host without an uploaded key can only wipe itself at the lease's end; this machine's
    watch destroys it then."""
    monkeypatch.setenv("GPU_SESSION_WATCH_INTERVAL", "0.5")
    stack = "lease-end"
    up = invoke("up", "--model", "gpu-session/tiny-chat", "--cloud", "lambda", "--no-configure", "--hours", "0.003",
                "--stack", stack, "--yes")  # fmt: skip
    assert up.returncode == 0 and alive(sim, stack), up.stderr[-3000:]
    _wait(lambda: Ledger().sessions(stack=stack)[0].ended_at, timeout=120)  # 0.003 h: about 11 s
    assert "the lease has ended: scrubbing and destroying" in daemon.log_path(stack, "watch").read_text()
    assert not alive(sim, stack) and not keys(sim, stack)


def test_up_sim_rehearses_without_an_account(tmp_path):
    """A new user's first command: no keys, no simulator running."""
    clean = {k: v for k, v in env().items() if k not in ("LAMBDA_API_KEY", "RUNPOD_API_KEY", "LAMBDA_API_BASE",
                                                         "RUNPOD_API_BASE_URL", "HF_ENDPOINT", "HF_TOKEN")}  # fmt: skip
    clean["GPU_SESSION_SIM_DIR"] = str(tmp_path / "sim")
    run = lambda *args: subprocess.run([INVOKE, *args], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=600)  # noqa: E731
    try:
        up = run("up", "--sim", "--no-configure", "--stack", "first", "--yes")
        assert up.returncode == 0, up.stderr[-3000:]
        assert "starting the cloud simulator" in up.stderr and "plan: " in up.stderr
        down = run("down", "--sim", "--stack", "first")
        assert down.returncode == 0 and "stack first: nothing left at the cloud" in down.stderr, down.stderr[-3000:]
        swept = run("sweep", "--sim", "--dry-run")  # the same simulator, no keys exported
        assert swept.returncode == 0 and swept.stderr.strip().endswith("no orphans"), swept.stderr[-3000:]
    finally:
        info = tmp_path / "sim" / "sim.json"
        if info.exists():
            os.kill(json.loads(info.read_text())["pid"], signal.SIGTERM)
            _wait(lambda: not info.exists(), timeout=60)


def test_available_lists_offers_with_the_catalog_models_that_fit(sim, sim_env):
    from gpu_session.session import status as session

    offers = session.available("lambda")
    prices = [o.price_per_hour for o, _ in offers]
    assert prices == sorted(prices) and all(not o.spot for o, _ in offers)
    for offer, fits in offers:
        assert "tiny" in fits
        assert ("llama-70b" in fits) == (offer.total_vram_gb >= 157.7)
        assert ("llama-8b" in fits) == (offer.total_vram_gb >= 18.0)


def test_setup_saves_checked_keys_and_defaults_that_up_uses(sim, sim_env, monkeypatch):
    config_file = Path(os.environ["XDG_CONFIG_HOME"]) / "gpu-session" / "config.yaml"
    monkeypatch.setenv("LAMBDA_API_KEY", "not-a-key")
    refused = invoke("setup", "--from-env")
    assert refused.returncode == 1 and "the lambda key was refused" in refused.stderr and "nothing was saved" in refused.stderr
    assert not config_file.exists()

    monkeypatch.setenv("LAMBDA_API_KEY", sim.lambda_key)
    saved = invoke("setup", "--from-env", "--model", "tiny", "--cloud", "lambda", "--hours", "1")
    assert saved.returncode == 0, saved.stderr
    assert "ok  lambda: " in saved.stdout and "ok  Hugging Face: sim-user" in saved.stdout
    assert oct(config_file.stat().st_mode & 0o777) == "0o600" and sim.lambda_key in config_file.read_text()

    # A shell with no keys: the file's keys and defaults are used.
    for var in ("LAMBDA_API_KEY", "RUNPOD_API_KEY", "HF_TOKEN"):
        monkeypatch.delenv(var)
    up = invoke("up", "--no-configure", "--stack", "from-config", "--yes")
    assert up.returncode == 0 and "plan: lambda: " in up.stderr and "1 h lease" in up.stderr, up.stderr[-2000:]
    assert invoke("down", "--stack", "from-config").returncode == 0 and not alive(sim, "from-config")
    config_file.unlink()


def test_a_killed_converge_leaves_no_secrets_behind_after_the_next_run(sim, sim_env, wheelhouse, tmp_path):
    """kill -9 during the playbook leaves ansible-runner's private folder (its extra vars hold the
    server's key); `down` removes it."""
    stack = "kill-secrets"
    runs = Path(os.environ["XDG_STATE_HOME"]) / "gpu-session" / "runs"
    with open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(
            [INVOKE, "up", "--model", "tiny", "--cloud", "lambda", "--backend", "transformers", "--stack", stack, "--yes"],
            cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )  # fmt: skip
    _wait(lambda: any(runs.glob("ansible-*")), timeout=180)
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    left = list(runs.glob("ansible-*"))
    assert left, (list(runs.iterdir()), proc.returncode, (tmp_path / "err").read_text()[-3000:])
    assert invoke("down", "--stack", stack).returncode == 0
    assert not [p for p in left if p.exists()] and not alive(sim, stack)


def test_sweep_ends_what_no_stack_owns_and_nothing_else(sim, sim_env, keypair):
    from gpu_session.clouds import LaunchSpec
    from gpu_session.clouds.runpod import RunpodCloud

    assert invoke("up", "--model", "tiny", "--cloud", "runpod", "--no-configure", "--stack", "owned", "--yes").returncode == 0
    cloud = RunpodCloud(api_key=sim.runpod_key, base_url=sim.env()["RUNPOD_API_BASE_URL"])
    ghost = cloud.launch(
        LaunchSpec(name="gpu-session-ghost-gpu", instance_type="NVIDIA GeForce RTX 4090", ssh_public_key=keypair.public)
    )

    listed = invoke("sweep", "--dry-run", "--json")  # no terminal, ends nothing: a cron job's check
    summary = json.loads(listed.stdout.strip().splitlines()[-1])
    assert listed.returncode == 0 and summary["kept"] == [ghost] and summary["terminated"] == [], listed.stdout
    told = invoke("sweep", "--dry-run").stderr  # a person is told what ends them
    assert "1 orphan(s) left as they are" in told and "`invoke sweep --yes` ends them all" in told, told
    assert len(alive(sim, "ghost")) == 1
    swept = invoke("sweep", "--yes")
    assert (
        swept.returncode == 0
        and f"terminated runpod instance {ghost}" in swept.stderr
        and "1 orphan(s) terminated" in swept.stderr
    )
    assert not alive(sim, "ghost") and len(alive(sim, "owned")) == 1
    assert invoke("sweep", "--yes").stderr.strip().endswith("no orphans")
    assert invoke("down", "--stack", "owned").returncode == 0 and not alive(sim, "owned")
