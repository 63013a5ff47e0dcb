"""The commands, as Invoke tasks: `invoke NAME` in a checkout, `gpu-session NAME` once installed.

Tasks stay thin: each parses its options and calls into the package.
"""

from __future__ import annotations

import os
import shlex
import sys

from invoke import Collection, task


@task(
    help={
        "args": "extra pytest arguments, e.g. '-k lambda -x'",
        "fast": "only the tests that need no simulator hosts (unit tests)",
    }
)
def test(c, args="", fast=False):
    """Run the test suite (what CI runs)."""
    target = "tests/unit" if fast else ""
    c.run(f"{shlex.quote(sys.executable)} -m pytest {target} {args}".strip(), pty=False)


@task(
    help={
        "port": "API port (default: a free one)",
        "boot_delay": "seconds from launch until a host starts (default 3)",
        "no_rate_limits": "turn off Lambda's documented rate limits",
        "loopback": "sshd on loopback ports instead of isolated network-namespace hosts",
        "env": 'print the running simulator\'s export lines and exit: eval "$(invoke sim --env)"',
        "list": "print the running simulator's instances, keys and faults",
        "json": "with --list: JSON",
        "cleanup": "remove what a simulator that died left behind",
        "fault": "inject a fault, API:OP:KIND[:TIMES] (repeatable)",
        "capacity": "instances a type can hold per region, CLOUD:TYPE[:REGION]=N (repeatable)",
    },
    iterable=["fault", "capacity"],
)
def sim(
    c,
    port=0,
    boot_delay=3.0,
    no_rate_limits=False,
    loopback=False,
    env=False,
    list=False,
    json=False,
    cleanup=False,
    fault=None,
    capacity=None,
):
    """Run the cloud simulator in the foreground; it prints `export` lines that point clients at it."""
    from gpu_session.sim.__main__ import main

    argv = ["--port", str(port), "--boot-delay", str(boot_delay)]
    argv += ["--no-rate-limits"] * no_rate_limits + ["--loopback"] * loopback + ["--env"] * env + ["--list"] * list
    argv += ["--json"] * json + ["--cleanup"] * cleanup
    for f in fault or []:
        argv += ["--fault", f]
    for cap in capacity or []:
        argv += ["--capacity", cap]
    sys.exit(main(argv))


@task(
    help={
        "lock": "re-resolve the engines' lock files from PyPI first (after changing a pin in gpu_session/engines.py)",
        "dest": "where the wheelhouse goes (default: $GPU_SESSION_WHEELHOUSE or /var/cache/gpu-session/wheels)",
        "venvs": "where the prebuilt venvs go (default: $GPU_SESSION_VENVS or /var/cache/gpu-session/venvs)",
    }
)
def engines(c, lock=False, dest="", venvs=""):
    """Build what the model server installs on hosts without internet (the simulator's): the wheelhouse,
    and a ready venv per CPU engine that those hosts link to instead of installing."""
    from pathlib import Path

    from gpu_session import engines as pinned

    if lock:
        for engine in pinned.ENGINES:
            print(f"locked {engine}: {pinned.lock(engine)}")
    wheelhouse = Path(dest) if dest else pinned.wheelhouse_dir()
    built = pinned.build_venvs(wheelhouse, Path(venvs) if venvs else None)  # the wheelhouse first
    print(f"wheelhouse ready: {wheelhouse}\nvenvs ready: {built}")


# --- the session -------------------------------------------------------------------------------


def _printer(as_json: bool):
    """How progress reaches the person: a line per step, or JSON lines for CI."""
    import json as jsonlib

    from rich.console import Console

    console = Console(stderr=True, highlight=False, soft_wrap=True)  # a message is one line, even in a log

    def on_event(event) -> None:
        if as_json:
            print(jsonlib.dumps({"event": event.kind, **{k: v for k, v in vars(event).items() if v and k != "kind"}}), flush=True)
        elif event.kind == "start" and event.op != "same":
            console.print(f"[bold]{event.op}[/] {event.type} {event.name} …")
        elif event.kind == "done" and event.op != "same":
            console.print(f"  [green]done[/] {event.op} {event.type} {event.name} ({event.seconds:.0f}s)")
        elif event.kind == "failed":
            console.print(f"  [red]failed[/] {event.name}: {event.message}")
        elif event.kind == "log" and event.message:
            console.print(f"  [dim]{event.message}[/]")

    def say(text: str) -> None:
        if as_json:
            print(jsonlib.dumps({"event": "say", "message": text}), flush=True)
        else:
            console.print(text)

    return on_event, say


def _user_config() -> dict:
    """~/.config/gpu-session/config.yaml: its keys fill the environment's gaps; its defaults are returned."""
    from gpu_session import config

    try:
        data = config.load()
    except config.ConfigFileError as e:
        _fail(e)
    config.apply_keys(data)
    return data


def _simulate(say) -> None:
    from gpu_session import session

    try:
        session.use_simulator(say)
    except (session.SessionError, session.StackError) as e:
        _fail(e)
    say("rehearsing against the simulator")


def _offer_teardown(stack: str, say, on_event) -> None:
    """After a cancelled up: whatever exists may bill. Ask (tear down by default); without a
    terminal to ask, tear down."""
    from gpu_session import session

    say(f"up was cancelled; stack {stack} may have created things that bill")
    if sys.stdin.isatty():
        if input("Tear down what exists now? [Y/n] ").strip().lower() not in ("", "y", "yes"):
            say(f"kept: `invoke down --stack {stack}` ends it later")
            return
    else:
        say("no terminal to ask: tearing down")
    session.down(stack, say=say, on_event=on_event)
    say(f"stack {stack}: nothing left at the cloud")


def _fail(e: Exception) -> None:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


@task(
    help={
        "model": "a Hugging Face model id (owner/name), or an alias from gpu_session/catalog.yaml (llama-8b, qwen-7b, …)",
        "cloud": "lambda, runpod or auto (the cheapest that fits, among the clouds you have keys for); `invoke setup` sets defaults",
        "gpu": "auto (the cheapest with room for the model) or a type: gpu_1x_a10, NVIDIA GeForce RTX 4090, A100 …",
        "gpus": "how many GPUs (tensor parallel); default 1",
        "hours": "the lease: the host wipes itself after this many hours; default 2",
        "max_price": "refuse any offer above this many dollars an hour",
        "budget": "dollars this session may spend: warned at 80 %, scrubbed and destroyed at 100 %",
        "disk": "disk in GB; default 100",
        "quantize": "serve 4-bit weights (less memory, cheaper GPUs)",
        "backend": "vllm, transformers or auto",
        "stack": "the session's name; default dev",
        "yes": "do not ask before spending",
        "json": "progress as JSON lines (CI)",
        "configure": "configure the host as a model server (default); --no-configure gives just the machine",
        "sim": "rehearse against the cloud simulator (started in the background if none runs): no account, no GPU, no bill",
    }
)
def up(c, model="", cloud="", gpu="", gpus=1, hours=None, max_price=None, budget=None, disk=100, quantize=False,
       backend="auto", stack="dev", yes=False, json=False, configure=True, sim=False):  # fmt: skip
    """Bring a private model server up on the cheapest GPU that fits: plan, ask, launch, configure."""
    from gpu_session import session

    on_event, say = _printer(json)
    defaults = _user_config()
    if sim:
        _simulate(say)
        model = model or "gpu-session/tiny-chat"
    model, cloud, gpu = (
        model or defaults.get("model", ""),
        cloud or defaults.get("cloud", "auto"),
        gpu or defaults.get("gpu", "auto"),
    )
    hours = hours or defaults.get("hours", 2.0)
    budget = budget or defaults.get("budget")
    if not model:
        _fail(ValueError("which model? --model owner/name (or --sim, to rehearse with the simulator's small model)"))
    opts = session.UpOptions(model, cloud, gpu, int(gpus), float(hours), float(max_price) if max_price else None,
                             float(budget) if budget else None, int(disk), quantize, backend, stack, configure)  # fmt: skip

    def confirm(plan) -> bool:
        say(f"plan: {plan.describe()}")
        if yes:
            return True
        if not sys.stdin.isatty():
            raise session.SessionError("no terminal to ask whether to launch: pass --yes to launch without asking")
        return input("Launch it? [y/N] ").strip().lower() in ("y", "yes")

    import signal

    from gpu_session.stack import StackCancelled

    # SIGTERM (a closed terminal, a cancelled CI job) is taken like Ctrl-C: the engine, in our process
    # group, finishes the step in flight and starts no other.
    signal.signal(signal.SIGTERM, lambda signum, frame: os.killpg(os.getpgrp(), signal.SIGINT))
    try:
        outputs = session.up(opts, confirm=confirm, say=say, on_event=on_event)
    except (session.SessionError, session.StackError, KeyboardInterrupt) as e:
        if isinstance(e, KeyboardInterrupt | StackCancelled):
            _offer_teardown(stack, say, on_event)
        _fail(e if not isinstance(e, KeyboardInterrupt) else RuntimeError("interrupted"))
    if not outputs:
        say("nothing launched")
        return
    say(f"{outputs['model']} is up on {outputs['cloud']} {outputs['gpu']} at ${float(outputs['price_per_hour']):.2f}/h; "
        f"lease ends {outputs['lease_expires_at']}. End it: invoke down --stack {stack}")  # fmt: skip
    if outputs.get("tunnel_port"):
        say(f"OpenAI-compatible endpoint: http://127.0.0.1:{outputs['tunnel_port']}/v1 (model {outputs['served_model_name']}; "
            f"API key in {outputs['session_dir']}/api_key)")  # fmt: skip


@task(
    help={
        "stack": "the session's name; default dev",
        "prompt": "send this one message, print the reply and leave (piped stdin works the same)",
        "image": "with --prompt (or piped stdin): ask about this picture (vision models)",
        "system": "a system prompt",
        "keep": "leave the session running after the chat (default: ask whether to end it)",
        "max_tokens": "cap each answer at this many tokens",
        "no_history": "keep nothing of this chat (by default it is saved, encrypted, per stack)",
    }
)
def chat(c, stack="dev", prompt="", image="", system="", keep=False, max_tokens=0, no_history=False):
    """Chat with the session's model through the tunnel; the answer streams as it is generated."""
    from rich.console import Console

    from gpu_session.chat import context, images, repl
    from gpu_session.chat.client import ChatClient, ChatError, printable
    from gpu_session.chat.history import History

    _user_config()
    try:
        client = ChatClient.for_stack(stack)
    except ChatError as e:
        _fail(e)
    facts = context.facts(stack, client.served_context())
    one_shot = bool(prompt or image) or not sys.stdin.isatty()
    chat = repl.Chat(
        client, facts, stack=stack, system=system, max_tokens=int(max_tokens) or None,
        history=None if no_history or one_shot else History(stack), console=Console(stderr=one_shot),
    )  # fmt: skip
    if one_shot:
        text = prompt or ("" if sys.stdin.isatty() else sys.stdin.read())
        try:
            message = (
                images.message(image, text, vision=facts.vision, model=facts.model)
                if image
                else {"role": "user", "content": text}
            )
            shown = printable if sys.stdout.isatty() else str  # a pipe gets the bytes as they are
            reply = chat.send(message, on_token=lambda t: print(shown(t), end="", flush=True))
        except (ChatError, images.ImageError) as e:
            _fail(e)
        if reply is None:
            sys.exit(1)  # it did not fit the context: said why
        print()
        print(reply.stats(), file=sys.stderr)
        return
    repl.run(chat)
    if not keep and input("End the session now (scrub and destroy)? [Y/n] ").strip().lower() in ("", "y", "yes"):
        down(c, stack=stack)


@task(
    help={
        "action": "list, show, export or purge",
        "stack": "whose history; default dev",
        "id": "a conversation (show, export); default the latest",
        "format": "export as markdown (default) or json",
        "out": "export to this file (default: print)",
    }
)
def history(c, action, stack="dev", id="", format="markdown", out=""):
    """The stack's chat history, encrypted at rest: list, show, export or purge (deletes it and its key)."""
    from gpu_session.chat.history import History, HistoryError, export

    h = History(stack)
    try:
        if action == "list":
            for conversation_id in h.ids():
                conversation = h.load(conversation_id)
                print(f"{conversation_id}  {conversation.model}  {len(conversation.messages)} messages")
            return
        if action == "purge":
            print(f"deleted {h.purge()} conversation(s) and the key of stack {stack}")
            return
        if action not in ("show", "export"):
            raise HistoryError(f"unknown action {action!r}: list, show, export or purge")
        ids = h.ids()
        if not ids:
            raise HistoryError(f"stack {stack} has no chat history")
        text = export(h.load(id or ids[-1]), "markdown" if action == "show" else format)
    except HistoryError as e:
        _fail(e)
    if out:
        from pathlib import Path

        if Path(out).exists():
            _fail(FileExistsError(f"{out} exists: give another name (nothing is overwritten)"))
        Path(out).write_text(text)
        Path(out).chmod(0o600)
    else:
        print(text, end="")


@task(
    help={
        "stack": "the session's name; default dev",
        "json": "progress as JSON lines (CI)",
        "sim": "the session is on the simulator",
    }
)
def down(c, stack="dev", json=False, sim=False):
    """Scrub the host, destroy it, check with the cloud that nothing is left, delete the session's secrets."""
    _user_config()
    from gpu_session import session

    on_event, say = _printer(json)
    if sim:
        _simulate(say)
    try:
        summary = session.down(stack, say=say, on_event=on_event)
    except (session.SessionError, session.StackError) as e:
        _fail(e)
    if summary["receipt"]:
        say(f"scrub receipt: {summary['receipt']}")
    for s in summary["sessions"]:
        say(f"{s['cloud']} {s['gpu']}: {s['cost']:.4f} USD for {s['model']}")
    say(f"stack {stack}: nothing left at the cloud")


@task(help={"action": "start, stop or status", "stack": "the session's name; default dev"})
def tunnel(c, action, stack="dev"):
    """The session's tunnel to its model server: start, stop or status. It reconnects by itself when the link drops."""
    from gpu_session import tunnel as tunnels

    try:
        if action == "start":
            t = tunnels.start(stack)
            print(f"tunnel up: http://127.0.0.1:{t.port}/v1")
        elif action == "stop":
            print("tunnel closed" if tunnels.stop(stack) else "no tunnel was running")
        elif action == "status":
            t = tunnels.status(stack)
            print(f"127.0.0.1:{t.port}: {'connected' if t.connected else 'reconnecting'}" if t.running else "no tunnel")
        else:
            _fail(ValueError(f"unknown action {action!r}: start, stop or status"))
    except (tunnels.TunnelError, ValueError) as e:
        _fail(e)


@task(help={"stack": "the session's name; default dev", "command": "run this instead of a shell"})
def ssh(c, stack="dev", command=""):
    """A shell on the session's host, with its own key and pinned host key (over the tunnel's connection)."""
    import os as _os

    from gpu_session import tunnel as tunnels
    from gpu_session.ssh import session_keys, ssh_command

    try:
        endpoint = tunnels.endpoint_of(stack)
    except tunnels.TunnelError as e:
        _fail(e)
    argv = ssh_command(session_keys(stack), endpoint) + ([command] if command else [])  # the host's shell parses it
    _os.execvp(argv[0], argv)


@task(help={"json": "as JSON"})
def status(c, json=False):
    """Every running session: cloud, GPU, uptime, cost so far, lease left, server health, tunnel; drift flagged."""
    _user_config()
    import json as jsonlib

    from rich.console import Console
    from rich.table import Table

    from gpu_session import session

    rows, unfinished = session.status(), session.interrupted()
    if json:
        print(jsonlib.dumps(rows + [{**u, "interrupted": True} for u in unfinished], indent=2))
        return
    for u in unfinished:
        print(f"{u['stack']}: holds {', '.join(u['resources'])}; {u['drift']}")
    if not rows:
        print("no session is running" + (" in the ledger" if unfinished else ""))
        return
    table = Table("stack", "cloud", "GPU", "up (h)", "USD so far", "lease left (h)", "server", "tunnel", "at the cloud")
    for r in rows:
        table.add_row(r["stack"], r["cloud"], r["gpu"], f"{r['uptime_h']:.2f}", f"{r['cost_so_far']:.4f}",
                      str(r.get("lease_left_h", "?")), r["server"], r["tunnel"], r["cloud_status"])  # fmt: skip
    Console().print(table)
    for r in rows:
        print(f"{r['stack']}: protected by " + "; ".join(r["protections"]))
        if r.get("drift"):
            print(f"{r['stack']}: {r['drift']}")


@task(
    help={"hours": "how many hours more", "stack": "the session's name; default dev", "json": "progress as JSON lines"},
    positional=["hours"],
)
def extend(c, hours, stack="dev", json=False):
    """Move the session's lease end later; the host keeps serving."""
    _user_config()
    from gpu_session import session

    on_event, say = _printer(json)
    try:
        ends = session.extend(stack, float(hours), on_event=on_event)
    except (session.SessionError, session.StackError, ValueError) as e:
        _fail(e)
    say(f"the lease now ends {ends}")


@task
def doctor(c):
    """Check this machine: the Pulumi CLI, ssh, the cloud keys (asked of each API), the privacy of config and state files."""
    _user_config()
    from gpu_session import doctor as checks

    results = checks.run()
    for check in results:
        print(f"{'ok ' if check.ok else 'FIX'}  {check.name:<12} {check.detail}")
    if not all(c.ok for c in results if not c.name.endswith(" key")) or not any(c.ok for c in results if c.name.endswith(" key")):
        sys.exit(1)


@task(help={"stack": "the session's name; default dev"})
def configure(c, stack="dev"):
    """Run the site playbook again on the session's live host (after a change to the roles, or to repair it)."""
    _user_config()
    from gpu_session import session

    _, say = _printer(False)
    try:
        session.reconfigure(stack, say=say)
    except (session.SessionError, RuntimeError) as e:
        _fail(e)


@task(
    help={
        "from_env": "take the keys from LAMBDA_API_KEY, RUNPOD_API_KEY and HF_TOKEN instead of asking",
        "model": "default model for up", "cloud": "default cloud", "gpu": "default GPU type",
        "hours": "default lease", "budget": "default budget (USD)",
    }
)  # fmt: skip
def setup(c, from_env=False, model="", cloud="", gpu="", hours=None, budget=None):
    """Save API keys (each checked against its API) and defaults in ~/.config/gpu-session/config.yaml (0600)."""
    import getpass

    from gpu_session import config

    try:
        data = config.load()
    except config.ConfigFileError as e:
        _fail(e)
    for key, var in config.KEYS.items():
        if from_env:
            value = os.environ.get(var, "")
        else:  # never an argument: it would show in the process list
            value = getpass.getpass(f"{var} (Enter keeps {'the saved one' if data.get(key) else 'none'}): ").strip()
        if not value:
            continue
        try:
            print(f"ok  {config.check_key(key, value)}")
        except config.ConfigFileError as e:
            _fail(ValueError(f"{e}; nothing was saved"))
        data[key] = value
    for key, value in (("model", model), ("cloud", cloud), ("gpu", gpu)):
        if value:
            data[key] = value
    for key, value in (("hours", hours), ("budget", budget)):
        if value is not None:
            data[key] = float(value)
    print(f"saved {config.save(data)}")


@task(
    help={
        "backend": "transformers (default: quick) or vllm",
        "cloud": "lambda (default) or runpod",
        "json": "also write the report to this file",
    }
)
def bench(c, backend="transformers", cloud="lambda", json=""):
    """Time one whole session against the simulator: up (provision, configure, server start), the tunnel's first-token overhead, a no-change configure, down."""
    from pathlib import Path

    from gpu_session import bench as benchmark
    from gpu_session import session

    _, say = _printer(False)
    try:
        report = benchmark.run(backend, cloud, say=say)
    except (session.SessionError, session.StackError) as e:
        _fail(e)
    print(benchmark.table(report))
    if json:
        benchmark.save(report, Path(json))


@task(help={"yes": "terminate every orphan without asking"})
def sweep(c, yes=False):
    """Find instances named like ours that no stack owns, and offer to terminate them."""
    _user_config()
    from gpu_session import session

    _, say = _printer(False)

    def confirm(cloud, inst) -> bool:
        say(f"orphan: {cloud} {inst.id} {inst.name} ({inst.raw_status}, ${inst.price_per_hour:.2f}/h)")
        return yes or input("Terminate it? [Y/n] ").strip().lower() in ("", "y", "yes")

    try:
        ended = session.sweep(confirm=confirm, say=say)
    except session.SessionError as e:
        _fail(e)
    say(f"{len(ended)} orphan(s) terminated" if ended else "no orphans")


@task(help={"cloud": "lambda, runpod or auto (every cloud you have a key for)"})
def available(c, cloud="auto"):
    """GPU offers with their prices and where they have capacity now."""
    _user_config()
    from rich.console import Console
    from rich.table import Table

    from gpu_session import session

    try:
        offers = session.available(cloud)
    except session.SessionError as e:
        _fail(e)
    table = Table("cloud", "GPU", "type", "GPUs", "memory", "$/h", "capacity", "catalog models that fit")
    for o, fits in offers:
        table.add_row(o.cloud, o.gpu_name, o.instance_type, str(o.gpu_count), f"{o.total_vram_gb} GB", f"{o.price_per_hour:.2f}",
                      ", ".join(o.regions) or "none", ", ".join(fits))  # fmt: skip
    Console().print(table)


@task
def cost(c):
    """What the sessions cost: each one, per month, and in all."""
    from rich.console import Console
    from rich.table import Table

    from gpu_session.ledger import Ledger

    ledger = Ledger()
    table = Table("stack", "cloud", "GPU", "model", "hours", "USD", "state")
    for s in ledger.sessions():
        table.add_row(
            s.stack, s.cloud, s.gpu, s.model, f"{s.hours:.2f}", f"{s.cost:.4f}", "running" if s.ended_at is None else "ended"
        )
    Console().print(table)
    for month, spent in ledger.by_month().items():
        print(f"{month}: {spent:.4f} USD")
    print(f"total: {ledger.total():.4f} USD")


ns = Collection.from_module(sys.modules[__name__])
