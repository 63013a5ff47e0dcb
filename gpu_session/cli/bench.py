"""`invoke bench`: one whole session against the simulator, timed (not a test: these machines are
noisy, so the report leans on ratios measured in the same run).

- up → ready, split into provision (key, instance, boot, SSH), configure (the playbook) and the
  model server's own start inside it; the share of up spent outside the server's start;
- the tunnel's first-token overhead: time to first token through client and tunnel, minus the same
  request made on the host (median of several);
- a no-change configure; down (scrub, destroy, verify);
- the Pulumi engine's own share: a no-change `up`, a `preview`, and `destroy` of an empty stack;
- with --cache (run_cache): the same model up twice on one cache volume, the second's phases
  beside the first's;
- the chat's rendering: a long markdown answer fed at 200 tokens/s to the chat's view; and as
  fast as it goes, to the chat's view drawing on every token and to the usual view that parses and
  draws the whole answer on every token.
"""

from __future__ import annotations

import io
import json
import statistics
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from gpu_session.chat.client import ChatClient
from gpu_session.chat.repl import streamed_markdown
from gpu_session.errors import GpuSessionError, our_command
from gpu_session.host.ssh import Endpoint, session_keys, ssh_command
from gpu_session.paths import stack_dir
from gpu_session.session import down, up
from gpu_session.session.plan import SessionError, UpOptions
from gpu_session.stack.automation import engine

STACK = "bench"
MODEL = "gpu-session/tiny-chat"
ROUNDS = 7
PROMPT = [{"role": "user", "content": "Say hello"}]

# Runs on the host: the same streamed request, to 127.0.0.1:8000 directly. The key is read from the
# server's env file there (never an argument); prints the median time to first byte of content.
ON_HOST = r"""
import json, statistics, sys, time, urllib.request
env = dict(l.strip().split("=", 1) for l in open("/opt/gpu-session/model-server.env") if "=" in l and not l.startswith("#"))
key = env["GPU_SESSION_API_KEY"].strip('"').strip("'")
body = json.dumps({"model": sys.argv[1], "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "Say hello"}]}).encode()
times = []
for _ in range(int(sys.argv[2])):
    req = urllib.request.Request("http://127.0.0.1:8000/v1/chat/completions", data=body,
                                 headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    start = time.monotonic()
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r:
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                times.append(time.monotonic() - start)
                break
print(statistics.median(times))
"""


def _host_first_token(endpoint: Endpoint, model: str) -> float:
    keys = session_keys(STACK)
    remote = f"sudo -n python3 - {model} {ROUNDS}" if endpoint.user != "root" else f"python3 - {model} {ROUNDS}"
    out = subprocess.run(ssh_command(keys, endpoint) + [remote], input=ON_HOST, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SessionError(f"the on-host measurement failed: {out.stderr.strip()[-500:]}")
    return float(out.stdout.strip())


def _answer_pieces(count: int) -> list[str]:
    """A long markdown answer in token-sized pieces: paragraphs, a list, a code block."""
    words = ("the", "model", "streams", "**tokens**", "as", "`code`", "and", "prose", "while", "it", "thinks,")
    pieces, i = [], 0
    while len(pieces) < count:
        if i % 60 == 59:
            pieces += ["\n\n", "- item", " one", "\n", "- item", " two", "\n\n", "```python", "\n", "x = 1", "\n", "```", "\n\n"]
        pieces.append(" " + words[i % len(words)])
        i += 1
    return pieces[:count]


@contextmanager
def _whole_answer_view(console):
    """The usual way, for comparison: the whole answer parsed and drawn again on every token."""
    from rich.live import Live
    from rich.markdown import Markdown

    pieces: list[str] = []
    with Live(Markdown(""), console=console, auto_refresh=False, vertical_overflow="visible") as live:

        def show(piece: str) -> None:
            pieces.append(piece)
            live.update(Markdown("".join(pieces)), refresh=True)

        yield show


def render(view, tokens: int = 2000, rate: float = 200) -> dict:
    """Feed an answer to a markdown `view` at `rate` tokens/s (as fast as it takes them for rate 0):
    how long the view kept the stream waiting, at worst and in all, how late it ended, and the
    rate it managed."""
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=100, height=40)
    pieces, busy, worst = _answer_pieces(tokens), 0.0, 0.0
    start = time.monotonic()
    with view(console) as show:
        for i, piece in enumerate(pieces):
            if rate:
                time.sleep(max(0.0, start + i / rate - time.monotonic()))
            began = time.monotonic()
            show(piece)
            took = time.monotonic() - began
            busy, worst = busy + took, max(worst, took)
    ended = time.monotonic()
    return {
        "busy_s": busy,
        "worst_ms": worst * 1000,
        "late_ms": (ended - (start + (tokens - 1) / rate)) * 1000 if rate else None,
        "tokens_per_s": tokens / (ended - start),
    }


def render_report(tokens: int = 2000, rate: float = 200) -> dict:
    paced = render(streamed_markdown, tokens, rate)
    every_token = render(lambda console: streamed_markdown(console, frames_per_s=float("inf")), tokens, 0)
    whole = render(_whole_answer_view, tokens, 0)
    return {
        "render_tokens": tokens,
        "render_at_200_tok_s_busy_share": round(paced["busy_s"] / (tokens / rate), 3),
        "render_at_200_tok_s_worst_frame_ms": round(paced["worst_ms"], 1),
        "render_at_200_tok_s_ends_late_ms": round(paced["late_ms"], 1),
        "render_max_tok_s_drawing_every_token": round(every_token["tokens_per_s"]),
        "render_max_tok_s_whole_answer_every_token": round(whole["tokens_per_s"]),
    }


def _engine_share() -> dict:
    """The Pulumi engine's own cost, on the live session's stack: a no-change `up` (the program runs,
    every resource diffs the same, Configure's playbook is not run), a `preview`, and `destroy` of an
    empty stack (the CLI, the backend and the state, with no program or provider to run). Seconds."""
    stack = engine(STACK)
    took = {}
    for name, operation in (("engine_no_change_up_s", stack.up), ("engine_preview_s", stack.preview)):
        start = time.monotonic()
        operation()
        took[name] = time.monotonic() - start
    empty = engine(f"{STACK}-empty")
    start = time.monotonic()
    empty.destroy()
    took["engine_destroy_empty_stack_s"] = time.monotonic() - start
    empty.remove()
    return took


def _end_after_failure(say) -> None:
    """After a failed step: down ends what up made. Its own failure is said with what to do, not
    raised, so the error that stopped the bench stays the one shown."""
    try:
        down.down(STACK, say=say, on_event=lambda _: None)
    except GpuSessionError as e:
        say(f"the bench's session is left ({e}): {our_command(f'down --stack {STACK}')} ends it")


def run(backend: str = "transformers", cloud: str = "lambda", say=print) -> dict:
    """One whole session on the simulator this process points at (the face starts it): the
    phases' seconds and the overheads, as bench.table prints them. SessionError when a step fails."""
    events = []
    start = time.monotonic()
    try:  # whatever fails, down ends what up made (_end_after_failure)
        outputs = up.up(
            UpOptions(MODEL, cloud=cloud, backend=backend, hours=1, stack=STACK),
            confirm=lambda plan: True, say=say, on_event=events.append,
        )  # fmt: skip
        up_s = time.monotonic() - start
        took = {e.type: e.seconds for e in events if e.kind == "done" and e.op == "create"}
        configured = json.loads((stack_dir(STACK) / "configured.json").read_text())
        client = ChatClient.for_stack(STACK)
        tunnel_s = statistics.median(
            client.stream(PROMPT, on_token=lambda _: None, max_tokens=4).first_token_s for _ in range(ROUNDS)
        )
        host_s = _host_first_token(Endpoint.of(outputs), outputs["served_model_name"])
        start = time.monotonic()
        up.reconfigure(STACK, say=lambda _: None)
        no_change_s = time.monotonic() - start
        engine_s = _engine_share()
    except BaseException:
        _end_after_failure(say)
        raise
    start = time.monotonic()
    down.down(STACK, say=say, on_event=lambda _: None)
    down_s = time.monotonic() - start
    server_s = configured["phases"]["server_start"]
    return {
        "backend": backend,
        "cloud": cloud,
        "model": MODEL,
        "up_to_ready_s": round(up_s, 1),
        "provision_s": round(took.get("GpuInstance", 0) + took.get("LambdaSshKey", 0), 1),
        "configure_s": round(took.get("Configure", 0), 1),
        "server_start_s": server_s,
        "outside_server_start_share": round((up_s - server_s) / up_s, 2),
        "first_token_through_tunnel_ms": round(tunnel_s * 1000, 1),
        "first_token_on_host_ms": round(host_s * 1000, 1),
        "tunnel_overhead_ms": round((tunnel_s - host_s) * 1000, 1),
        "no_change_configure_s": round(no_change_s, 1),
        **{k: round(v, 1) for k, v in engine_s.items()},
        "no_change_up_share_of_up": round(engine_s["engine_no_change_up_s"] / up_s, 2),
        "down_s": round(down_s, 1),
        **render_report(),
    }


# Where the cache bench keeps its volume on RunPod, which places pods itself: one of RunPod's data
# centers (the simulator has the same ones).
RUNPOD_DATA_CENTER = "EU-RO-1"


def _cached_session(backend: str, cloud: str, say) -> dict:
    """One session on the cache (up, then down): its up → ready and the converge's phases and
    cache facts (configured.json)."""
    events = []
    start = time.monotonic()
    try:  # a failed up too: down ends what it made, so the cache is no longer in use and can go
        up.up(UpOptions(MODEL, cloud=cloud, backend=backend, hours=1, stack=STACK), confirm=lambda plan: True, say=say,
              on_event=events.append)  # fmt: skip
        up_s = time.monotonic() - start
        took = {e.type: e.seconds for e in events if e.kind == "done" and e.op == "create"}
        configured = json.loads((stack_dir(STACK) / "configured.json").read_text())
    except BaseException:
        _end_after_failure(say)
        raise
    down.down(STACK, say=say, on_event=lambda _: None)
    return {
        "up_to_ready_s": round(up_s, 1),
        "provision_s": round(took.get("GpuInstance", 0) + took.get("LambdaSshKey", 0), 1),
        "converge_s": configured["seconds"],
        **configured["phases"],
        "cache": configured.get("cache") or {},
        "slowest_outside_load": configured.get("slowest_outside_load") or {},
        "strategy": configured.get("strategy") or "linear",
    }


def run_cache(backend: str = "transformers", cloud: str = "lambda", say=print) -> dict:
    """The same model up twice on one cache volume (created here, deleted after): the second up's
    phases beside the first's, and the second's up → ready minus the model server's own start
    (target: under 10 s on the simulator). SessionError when a step fails."""
    from gpu_session.session import cache
    from gpu_session.session.plan import prepare

    if cloud == "runpod":
        region = RUNPOD_DATA_CENTER
    else:
        _, plans = prepare(UpOptions(MODEL, cloud=cloud, backend=backend, cache=False))
        region = plans[0].region
    cache.create(cloud, region, 50, say=say, on_event=lambda _: None)
    try:
        first = _cached_session(backend, cloud, say)
        second = _cached_session(backend, cloud, say)
    except BaseException:  # the cache goes too, and the error that stopped the bench is the one shown
        try:
            cache.rm(cloud, region, say=say, on_event=lambda _: None)
        except GpuSessionError as e:
            say(f"the bench's cache is kept ({e}): {our_command(f'cache rm --cloud {cloud} --region {region} --yes')} deletes it")
        raise
    cache.rm(cloud, region, say=say, on_event=lambda _: None)
    rows = {}
    for key in ("up_to_ready_s", "install", "download_wait", "server_start"):
        rows[f"first_{key}"], rows[f"second_{key}"] = first.get(key), second.get(key)
    return {
        "backend": backend,
        "cloud": cloud,
        "model": MODEL,
        "ansible_strategy": second["strategy"],  # ANSIBLE_STRATEGY=mitogen_linear: Mitogen's (README)
        **rows,
        "first_cache": "engine {engine}, weights {weights}".format(**{"engine": "?", "weights": "?", **first["cache"]}),
        "second_cache": "engine {engine}, weights {weights}".format(**{"engine": "?", "weights": "?", **second["cache"]}),
        "second_up_outside_server_start_s": round(second["up_to_ready_s"] - second["server_start"], 1),
        # Where those seconds went: outside the converge (the instance: its key, launch, boot and SSH;
        # the rest: the plan and the Pulumi engine, and after it the outputs, ledger and tunnel) and
        # in it outside the server's start, with the converge's slowest tasks of those not run while
        # the engine loaded (the lease's are).
        "second_before_converge_s": round(second["up_to_ready_s"] - second["converge_s"], 1),
        "second_provision_s": second["provision_s"],
        "second_converge_outside_server_start_s": round(second["converge_s"] - second["server_start"], 1),
        "second_slowest_tasks_outside_server_start": ", ".join(
            f"{task} {s} s" for task, s in list(second["slowest_outside_load"].items())[:4]
        ),
        "second_over_first_up": round(second["up_to_ready_s"] / first["up_to_ready_s"], 2),
    }


def table(report: dict) -> str:
    rows = [(k.replace("_", " "), v) for k, v in report.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def save(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")
