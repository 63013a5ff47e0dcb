"""The commands, as Invoke tasks: `invoke NAME` in a checkout, `gpu-session NAME` once installed.

Tasks stay thin: each parses its options, calls one flow and prints. One error boundary: every task
is a `command`, so an error of ours (errors.GpuSessionError, whose message says what to do) becomes
one line on stderr and exit code 1; anything else is a bug and keeps its traceback. Sub-actions are
tasks of their own collection (`invoke tunnel.start`, `invoke history.export`), parsed by Invoke.
"""

from __future__ import annotations

import contextlib
import functools
import json as jsonlib
import os
import shlex
import sys

from invoke import Collection, Exit, Task, task

from gpu_session.errors import SIM_ENV, GpuSessionError, our_command

STACK_HELP = "the session's name; default dev"


class UsageError(GpuSessionError):
    """An option's value is wrong; the message names the option and what it takes."""


class _Task(Task):
    """Invoke's Task, less the short flag `-`: Invoke's automatic short flags take an option's
    first free character, which for `--cache-gated` (every letter taken) was its dash (`--`)."""

    def arg_opts(self, name, default, taken_names):
        opts = super().arg_opts(name, default, taken_names)
        opts["names"] = [n for n in opts["names"] if n != "-"]
        return opts


def command(*args, **kwargs):
    """Invoke's @task, inside the one error boundary."""

    def wrap(body):
        @functools.wraps(body)
        def run(*a, **kw):
            try:
                return body(*a, **kw)
            except GpuSessionError as e:
                if kw.get("json") is True:  # bench's --json is a file
                    one_object = body.__name__ == "up" and kw.get("dry_run")  # `up --dry-run --json`: the README's shape
                    _failed_summary(str(e), one_object=one_object, **e.summary)
                raise Exit(f"error: {e}", code=1) from None

        return task(*args, klass=_Task, **kwargs)(run)

    if len(args) == 1 and callable(args[0]) and not kwargs:  # bare @command
        body, args = args[0], ()
        return wrap(body)
    return wrap


def _failed_summary(error: str, one_object: bool = False, **extra) -> None:
    """A failed --json command's last stdout line, which a script reads: {"event": "summary", "ok":
    false, "error": the words of the stderr line, **extra}; without "event" for a one-object answer."""
    failed = {"ok": False} if one_object else {"event": "summary", "ok": False}
    print(jsonlib.dumps(failed | {"error": error, **extra}), flush=True)


def _config_word(value, key: str):
    """An option that is also a stack config key, checked by the config's own parser (the words
    `pulumi config set` takes: gpu_session.stack.config.PARSERS) before anything starts; "" or None
    gives None; UsageError naming the option and its words."""
    from gpu_session.stack.config import PARSERS

    if not value:
        return None
    try:
        return PARSERS[key](value)
    except ValueError as e:
        raise UsageError(f"--{key} takes {e} (got {value!r})") from None


def _number(value, option: str, kind=float):
    """An option's text as a number above 0 (None stays None); UsageError naming the option."""
    if value is None:
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"--{option.replace('_', '-')} takes a number (got {value!r})") from None
    if not number > 0:
        raise UsageError(f"--{option.replace('_', '-')} takes a number above 0 (got {value!r})")
    return number


def _ask(question: str, default: bool) -> bool:
    """A yes/no question on the terminal; Enter gives `default`."""
    answer = input(f"{question} [{'Y/n' if default else 'y/N'}] ").strip().lower()
    return default if not answer else answer in ("y", "yes")


@command(
    help={
        "args": "extra pytest arguments, e.g. '-k lambda -x'",
        "fast": "only the tests that need no simulator hosts (unit tests)",
        "workers": "pytest-xdist worker processes, each taking whole test modules (0: one process)",
    }
)
def test(c, args="", fast=False, workers=2):
    """Run the test suite (what CI runs). Its end-to-end and role tests mostly wait on SSH, the
    Pulumi engine and the simulator's hosts: two workers, each taking whole modules (their
    module-scoped fixtures start once), the slowest first (tests/conftest.py)."""
    target = "tests/unit" if fast else ""
    parallel = f"-n {int(workers)} --dist loadfile --no-loadscope-reorder" if int(workers) > 0 else ""
    c.run(f"{shlex.quote(sys.executable)} -m pytest {target} {parallel} {args}".strip(), pty=False)


@command(
    help={
        "port": "API port (default: a free one)",
        "boot_delay": "seconds from launch until a host starts (default 3)",
        "no_rate_limits": "turn off Lambda's documented rate limits",
        "loopback": "sshd on loopback ports instead of isolated network-namespace hosts",
        "env": 'print the running simulator\'s export lines and exit: eval "$(invoke sim --env)"',
        "list": "print the running simulator's instances, keys and faults",
        "json": "with --list: JSON",
        "cleanup": "remove what a simulator that died left behind",
        "stop": "stop the running simulator (the one `up --sim` started in the background too); its volumes stay",
        "fault": "inject a fault, API:OP:KIND[:TIMES] (repeatable)",
        "capacity": "instances a type can hold per region, CLOUD:TYPE[:REGION]=N (repeatable)",
        "hub_extra": "more Hub entries from a YAML file, at start or into a running simulator (repeatable; README)",
    },
    iterable=["fault", "capacity", "hub_extra"],
    auto_shortflags=False,  # long options only: `-h` must stay help, not --hub-extra
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
    stop=False,
    fault=None,
    capacity=None,
    hub_extra=None,
):
    """Run the cloud simulator in the foreground; it prints `export` lines that point clients at it."""
    from gpu_session.sim.__main__ import main

    argv = ["--port", str(port), "--boot-delay", str(boot_delay)]
    argv += ["--no-rate-limits"] * no_rate_limits + ["--loopback"] * loopback + ["--env"] * env + ["--list"] * list
    argv += ["--json"] * json + ["--cleanup"] * cleanup + ["--stop"] * stop
    for f in fault or []:
        argv += ["--fault", f]
    for cap in capacity or []:
        argv += ["--capacity", cap]
    for f in hub_extra or []:
        argv += ["--hub-extra", f]
    sys.exit(main(argv))


@command(
    help={
        "lock": "re-resolve the engines' lock files from PyPI first (after changing a pin in gpu_session/host/engines.py)",
        "dest": "where the wheelhouse goes (default: $GPU_SESSION_WHEELHOUSE or /var/cache/gpu-session/wheels)",
        "venvs": "where the prebuilt venvs go (default: $GPU_SESSION_VENVS or /var/cache/gpu-session/venvs)",
    }
)
def engines(c, lock=False, dest="", venvs=""):
    """Build the wheelhouse and prebuilt engine venvs that hosts without internet (the simulator's) install from.

    Each CPU engine gets a ready venv, which those hosts link to instead of installing."""
    from pathlib import Path

    from gpu_session.host import engines as pinned

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

    from gpu_session import progress
    from gpu_session.stack.automation import brief

    console = Console(stderr=True, highlight=False, soft_wrap=True)  # a message is one line, even in a log

    def on_event(event) -> None:
        if as_json:
            found = progress.read(event.message) if event.kind == "log" else None
            shown = (
                {"event": "progress", **found}
                if found
                else {"event": event.kind, **{k: v for k, v in vars(event).items() if v and k != "kind"}}
            )
            print(jsonlib.dumps(shown), flush=True)
        elif event.kind == "start" and event.op != "same":
            console.print(f"{event.op} {event.type} {event.name} …", markup=False)
        elif event.kind == "done" and event.op != "same":
            console.print(f"  done {event.op} {event.type} {event.name} ({event.seconds:.0f}s)", markup=False)
        elif event.kind == "failed" and event.name and event.message:
            # A provider's traceback as its last line (the log and --json keep the whole); the
            # engine's own nameless lines ("update failed") come once, in the error at the end.
            console.print(f"  failed {event.name}: {brief(event.message)}", markup=False)
        elif event.kind in ("log", "notice") and event.message:
            console.print(f"  {event.message}", markup=False)

    def say(text: str) -> None:
        if as_json:
            print(jsonlib.dumps({"event": "say", "message": text}), flush=True)
        else:
            console.print(text, markup=False)

    return on_event, say


def _view(command: str, stack: str, verbose: bool):
    """The live view of `up`'s or `down`'s phases, logging to logs/<stack>-<command>.log (0600)."""
    from gpu_session.cli import view
    from gpu_session.local import daemon
    from gpu_session.paths import stack_dir, write_private

    stack_dir(stack)  # a bad name is refused before anything is written
    log = daemon.log_path(stack, command)
    if not log.exists():
        write_private(log, "")
    return view.SessionView(view.UP if command == "up" else view.DOWN, log, verbose=verbose)


def _user_config() -> dict:
    """~/.config/gpu-session/config.yaml: its keys fill the environment's gaps; its defaults are returned."""
    from gpu_session.local import config

    data = config.load()
    config.apply_keys(data)
    return data


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _simulate(say) -> None:
    """`--sim`: the real engine against the simulator (started in the background when none runs)."""
    from gpu_session.stack.automation import pulumi_binary

    try:
        from gpu_session.sim import background as simulator
    except ImportError as e:  # a plain install, without the simulator's libraries
        raise UsageError(f"the simulator needs its extra: pip install 'gpu-session[sim]' ({e})") from None
    pulumi_binary()  # a rehearsal runs the real engine: say how to get it before starting anything
    simulator.use(say)
    os.environ[SIM_ENV] = "1"  # hints name --sim (errors.our_command), here and in the engine's processes
    say("rehearsing against the simulator")


def _offer_teardown(stack: str, say, on_event) -> None:
    """After a cancelled up: whatever exists may bill. Ask (tear down by default); without a
    terminal to ask, tear down."""
    from gpu_session.session.down import down as end

    say(f"up was cancelled; stack {stack} may have created things that bill")
    if sys.stdin.isatty():
        if not _ask("Tear down what exists now?", default=True):
            say(f"kept: {our_command(f'down --stack {stack}')} ends it later")
            return
    else:
        say("no terminal to ask: tearing down")
    end(stack, say=say, on_event=on_event)
    say(f"stack {stack}: nothing left at the cloud")


@command(
    help={
        "model": "a Hugging Face model id (owner/name), or an alias from gpu_session/catalog.yaml (llama-8b, qwen-7b, …)",
        "cloud": "lambda, runpod or auto (the cheapest that fits, among the clouds you have keys for); `invoke setup` sets defaults",
        "gpu": "auto (the cheapest with room for the model) or a type: gpu_1x_a10, NVIDIA GeForce RTX 4090, A100 …",
        "gpus": "how many GPUs (tensor parallel); default 1",
        "hours": "the lease: the host wipes itself after this many hours; default 2",
        "max_price": "refuse any offer above this many dollars an hour",
        "budget": "dollars this session may spend: warned at 80 %, scrubbed and destroyed at 100 %",
        "disk": "disk in GiB; default: sized from the weights (can only be raised)",
        "context": "tokens of context the GPU must hold at least; default: the model's own, at most 8192",
        "trust_remote_code": "let the engine run code from the model's repo (config.json's auto_map): read it first",
        "dry_run": "plan and check everything, launch nothing: exit 0 when up would go ahead, 1 with the reason when not",
        "quantize": "serve 4-bit weights (less memory, cheaper GPUs)",
        "backend": "vllm, transformers or auto",
        "stack": STACK_HELP,
        "yes": "do not ask before spending",
        "json": "progress as JSON lines (CI); with --dry-run, the plan as one JSON object",
        "configure": "configure the host as a model server (default); --no-configure gives just the machine",
        "sim": "rehearse against the cloud simulator (started in the background if none runs): no account, no GPU, no bill",
        "verbose": "show Ansible's task lines too (they are always in the session's log)",
        "cache": "use a cache volume (`gpu-session cache create`) where one is in a region with the GPU (default); --no-cache goes without",
        "cache_gated": "a gated or private model's weights may go on the cache volume too (by default they stay off it)",
    }
)
def up(c, model="", cloud="", gpu="", gpus=None, hours=None, max_price=None, budget=None, disk=None, context=None,
       trust_remote_code=False, quantize=False, backend="", stack="dev", yes=False, json=False, configure=True, sim=False,
       verbose=False, dry_run=False, cache=True, cache_gated=False):  # fmt: skip
    """Bring a private model server up on the cheapest GPU that fits: plan, ask, launch, configure."""

    import json as jsonlib

    from gpu_session.host.ansible import check_strategy
    from gpu_session.paths import checked_stack_name
    from gpu_session.session.plan import UpOptions
    from gpu_session.session.up import up as bring_up
    from gpu_session.stack.automation import StackCancelled, take_sigterm_as_ctrl_c

    plain_event, plain_say = _printer(json)
    checked_stack_name(stack)  # a bad name is refused before anything is written
    if configure:
        check_strategy()
    defaults = _user_config()  # the user's defaults; UpOptions' own fill the rest
    model = model or ("gpu-session/tiny-chat" if sim else defaults.get("model", ""))
    if not model:
        raise UsageError("which model? --model owner/name (or --sim, to rehearse with the simulator's small model)")
    given = {
        "cloud": cloud or defaults.get("cloud"), "gpu": gpu or defaults.get("gpu"), "gpus": _number(gpus, "gpus", int),
        "hours": _number(hours or defaults.get("hours"), "hours"), "max_price": _number(max_price, "max_price"),
        "budget": _number(budget or defaults.get("budget"), "budget"), "disk": _number(disk, "disk", int),
        "context": _number(context, "context", int), "backend": _config_word(backend, "backend"),
    }  # fmt: skip
    opts = UpOptions(model, **{k: v for k, v in given.items() if v is not None}, quantize=quantize,
                     trust_remote_code=trust_remote_code, stack=stack, configure=configure, cache=cache,
                     cache_gated=cache_gated)  # fmt: skip
    if not yes and not dry_run and not sys.stdin.isatty():  # after the options, before a simulator starts or a log is opened
        raise UsageError("no terminal to ask whether to launch: pass --yes to launch without asking (--dry-run shows the plan)")
    view = None if json or dry_run else _view("up", stack, verbose)  # a dry run leaves no stack folder, no log
    on_event, say = (view.on_event, view.say) if view else (plain_event, plain_say)
    if sim:  # after the options are checked: a typo starts nothing
        _simulate(_stderr if dry_run and json else plain_say if dry_run else say)
    if dry_run:
        return _dry_run(opts, json, plain_say)

    launching = []  # the accepted plan: from then on, an interrupted up may have made what bills

    def confirm(plan) -> bool:
        _say_plan(plan, say)
        accepted = yes or _ask("Launch it?", default=False)
        if accepted:
            launching.append(plan)
        if accepted and view:
            view.planned(plan.offer.price_per_hour)
        return accepted

    take_sigterm_as_ctrl_c()
    try:
        with view or contextlib.nullcontext():
            outputs = bring_up(opts, confirm=confirm, say=say, on_event=on_event)
    except (KeyboardInterrupt, StackCancelled) as e:
        if launching:
            _offer_teardown(stack, plain_say, plain_event)
        error = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
        if json:
            _failed_summary(error)
        raise Exit(f"error: {error}", code=1) from None
    say = plain_say
    if not outputs:
        say("nothing launched")
    else:
        say(f"{outputs['model']} is up on {outputs['cloud']} {outputs['gpu']} at ${float(outputs['price_per_hour']):.2f}/h; "
            f"lease ends {outputs['lease_expires_at']}. End it: {our_command(f'down --stack {stack}', quoted=False)}")  # fmt: skip
    if outputs.get("tunnel_port"):
        say(f"OpenAI-compatible endpoint: http://127.0.0.1:{outputs['tunnel_port']}/v1 (model {outputs['served_model_name']}; "
            f"API key in {outputs['session_dir']}/api_key)")  # fmt: skip
    if json:  # the last line, which a script reads (as down's): what it needs to reach the model
        print(jsonlib.dumps({"event": "summary", "ok": True, **_up_summary(stack, outputs)}), flush=True)


def _up_summary(stack: str, outputs: dict) -> dict:
    """`up --json`'s summary: the stack's plain outputs (infra/__main__.py's; none is a secret), and
    the endpoint and the file holding its API key when the tunnel is up; {"launched": false} if declined."""
    if not outputs:
        return {"stack": stack, "launched": False}
    shown = ("instance_id", "cloud", "gpu", "gpu_count", "price_per_hour", "model", "backend", "served_model_name",
             "lease_expires_at", "host", "port", "user", "session_dir", "tunnel_port")  # fmt: skip
    summary = {"stack": stack, "launched": True, **{k: outputs[k] for k in shown if k in outputs}}
    if outputs.get("tunnel_port"):
        summary |= {
            "endpoint": f"http://127.0.0.1:{outputs['tunnel_port']}/v1",
            "api_key_file": f"{outputs['session_dir']}/api_key",
        }
    return summary


def _say_plan(plan, say) -> None:
    """The plan, and on a line of its own what it does about caches (when there are any)."""
    say(f"plan: {plan.describe()}")
    if plan.cache_line():
        say(f"  {plan.cache_line()}")


def _dry_run(opts, as_json: bool, say) -> None:
    """`up --dry-run`: the plan and every check before launch, nothing launched."""
    import json as jsonlib

    from gpu_session.session.plan import prepare
    from gpu_session.session.up import is_up

    try:
        opts, plans = prepare(opts)
    except GpuSessionError as e:  # the plan's refusals, and a cloud or the Hub that fails to answer
        if not as_json:
            raise
        print(jsonlib.dumps({"ok": False, "error": str(e)}))
        raise Exit(code=1) from None
    plan = plans[0]
    try:
        already_up = is_up(opts.stack)  # what up itself refuses: said, not "would ask"
    except GpuSessionError:  # no Pulumi here, or a stack it cannot read: the plan needs neither
        already_up = None
    if as_json:
        print(jsonlib.dumps({**plan.summary(opts.model), "stack": opts.stack, "already_up": already_up}))
        return
    _say_plan(plan, say)
    weights = f"{plan.weights_gb} GiB" if plan.weights_gb >= 0.1 else "under 0.1 GiB"
    say(f"{opts.model}: {weights} of weights, {plan.disk_gb} GiB of disk, served by {plan.backend}")
    if already_up:
        say(f"dry run: nothing launched (stack {opts.stack} is already up, so up would refuse: --stack NAME plans another)")
    else:
        say("dry run: nothing launched (without --dry-run, up would ask to launch this, or launch it with --yes)")


@command(
    help={
        "stack": STACK_HELP,
        "prompt": "send this one message, print the reply and leave (piped stdin works the same)",
        "image": "with --prompt (or piped stdin): ask about this picture (vision models)",
        "system": "a system prompt",
        "keep": "leave the session running after the chat (default: ask whether to end it)",
        "yes": "end the session after the chat without asking",
        "max_tokens": "cap each answer at this many tokens",
        "no_history": "keep nothing of this chat (by default it is saved, encrypted, per stack)",
    }
)
def chat(c, stack="dev", prompt="", image="", system="", keep=False, yes=False, max_tokens=0, no_history=False):
    """Chat with the session's model through the tunnel; the answer streams as it is generated."""
    from rich.console import Console

    from gpu_session.chat import context, images, repl
    from gpu_session.chat.client import ChatClient, printable
    from gpu_session.chat.history import History
    from gpu_session.session.plan import use_session

    _user_config()
    use_session(stack)  # from any shell: the Hub the session's model came from
    client = ChatClient.for_stack(stack)
    facts = context.facts(stack, client.served_context())
    one_shot = bool(prompt or image) or not sys.stdin.isatty()
    chat = repl.Chat(
        client, facts, stack=stack, system=system, max_tokens=_number(max_tokens or None, "max_tokens", int),
        history=None if no_history or one_shot else History(stack), console=Console(stderr=one_shot),
    )  # fmt: skip
    if one_shot:
        text = prompt or ("" if sys.stdin.isatty() else sys.stdin.read())
        message = (
            images.message(image, text, vision=facts.vision, model=facts.model) if image else {"role": "user", "content": text}
        )
        shown = printable if sys.stdout.isatty() else str  # a pipe gets the bytes as they are
        reply = chat.send(message, on_token=lambda t: print(shown(t), end="", flush=True))
        if reply is None:
            raise Exit(code=1)  # it did not fit the context: said why
        print()
        print(reply.stats(), file=sys.stderr)
        return
    repl.run(chat)
    if not keep and (yes or _ask("End the session now (scrub and destroy)?", default=True)):
        down(c, stack=stack)


# --- history: the stack's chat history, encrypted at rest --------------------------------------

HISTORY_ID = "a conversation; default the latest"


def _conversation(stack: str, conversation_id: str):
    from gpu_session.chat.history import History, HistoryError

    h = History(stack)
    ids = h.ids()
    if not ids:
        raise HistoryError(f"stack {stack} has no chat history")
    return h.load(conversation_id or ids[-1])


@command(name="list", help={"stack": STACK_HELP, "json": "as JSON"})
def history_list(c, stack="dev", json=False):
    """The stack's saved conversations: id, model, messages."""
    import json as jsonlib

    from gpu_session.chat.history import History

    h = History(stack)
    found = [(i, h.load(i)) for i in h.ids()]
    if json:
        print(jsonlib.dumps([{"id": i, "model": conv.model, "messages": len(conv.messages)} for i, conv in found], indent=2))
        return
    for conversation_id, conversation in found:
        print(f"{conversation_id}  {conversation.model}  {len(conversation.messages)} messages")
    if not found:
        print(f"stack {stack} has no saved conversations")


@command(name="show", help={"stack": STACK_HELP, "id": HISTORY_ID})
def history_show(c, stack="dev", id=""):
    """A saved conversation, as markdown."""
    from gpu_session.chat.history import export

    print(export(_conversation(stack, id), "markdown"), end="")


@command(
    name="export",
    help={"stack": STACK_HELP, "id": HISTORY_ID, "format": "markdown (default) or json", "out": "this file (default: print)"},
)
def history_export(c, stack="dev", id="", format="markdown", out=""):
    """A saved conversation as markdown or JSON, printed or written (0600) to a new file."""

    from gpu_session.chat.history import export

    text = export(_conversation(stack, id), format)
    if not out:
        print(text, end="")
        return
    try:
        with open(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:  # 0600 from the first byte
            f.write(text)
    except FileExistsError:
        raise UsageError(f"{out} exists: give another name (nothing is overwritten)") from None


@command(name="purge", help={"stack": STACK_HELP, "yes": "do not ask"})
def history_purge(c, stack="dev", yes=False):
    """Delete the stack's history and its key (asks first)."""
    from gpu_session.chat.history import History

    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("no terminal to ask whether to delete the history: pass --yes")
        if not _ask(f"Delete every conversation of stack {stack}, and its key?", default=False):
            print("kept")
            return
    print(f"deleted {History(stack).purge()} conversation(s) and the key of stack {stack}")


@command(
    help={
        "stack": STACK_HELP,
        "json": "progress as JSON lines, and the summary as the last (CI)",
        "sim": "start the simulator if none runs (a session made with --sim remembers its simulator anyway)",
        "yes": "accepted for scripts that pass it to every command: down never asks",
        "verbose": "show Ansible's task lines too (they are always in the session's log)",
    }
)
def down(c, stack="dev", json=False, sim=False, yes=False, verbose=False):
    """Scrub the host, destroy it, check with the cloud that nothing is left, delete the session's secrets."""
    import json as jsonlib

    from gpu_session.session.down import down as end

    _user_config()
    on_event, say = _printer(json)
    if sim:
        _simulate(say)
    if json:
        summary = end(stack, say=say, on_event=on_event)
    else:
        with _view("down", stack, verbose) as view:
            view.begin()
            summary = end(stack, say=view.say, on_event=view.on_event)
            if summary["clouds_asked"]:  # with no key and nothing here, no cloud was asked: the summary says so
                view.done("verify")
    if json:
        print(jsonlib.dumps({"event": "summary", "ok": True, **summary}), flush=True)
        return
    for line in _down_summary(summary):
        say(line)


def _down_summary(s: dict) -> list[str]:
    """What `down` did and proved, for a person (the receipt's JSON stays on disk)."""
    lines = []
    r = s["receipt"]
    if r:
        verified = r.get("verified") or {}
        lines.append(
            f"scrubbed {r['instance_id']}: {len(r.get('removed') or [])} paths removed, "
            f"{verified.get('paths_absent', 0)} checked absent, {verified.get('canaries_checked', 0)} canaries found nowhere, "
            f"no process of {verified.get('no_process_of', '?')}, nothing listening on {verified.get('nothing_listening_on', '?')}"
        )
        lines.append(f"  receipt: {s['receipt_file']}")
    if s["terminated_orphans"]:
        lines.append(f"ended what was left at the cloud: {', '.join(s['terminated_orphans'])}")
    if not s["clouds_asked"]:
        return [*lines, f"stack {s['stack']}: nothing is up here; no cloud key is set, so no cloud was asked "
                        "(export LAMBDA_API_KEY or RUNPOD_API_KEY, or pass --sim, to ask them)",
                *_caches_kept(s.get("caches") or [])]  # fmt: skip
    lines.append(f"asked {' and '.join(s['clouds_asked'])}: no instance or SSH key of stack {s['stack']} is left")
    for e in s["sessions"]:
        lines.append(
            f"cost: ${e['cost']:.4f} for {e['model']} on {e['cloud']} {e['gpu']} ({e['hours']:.2f} h at ${e['price_per_hour']:.2f}/h)"
        )
    lines.append(f"stack {s['stack']}: nothing left at the cloud")
    return [*lines, *_caches_kept(s.get("caches") or [])]


def _caches_kept(caches: list[dict]) -> list[str]:
    """The cache volumes that remain after `down`, and what each bills a month."""
    from gpu_session.session.cache import monthly_text, rm_command

    lines = []
    for c in caches:
        what = _cache_size(c) if c["exists"] else c.get("note") or "gone at the cloud"  # or: the cloud did not answer
        lines.append(
            f"cache {c['cloud']} {c['region']} kept: {what}, {monthly_text(c['monthly_usd'])} — "
            f"{rm_command(c['cloud'], c['region'])} deletes it"
        )
    return lines


def _cache_size(c: dict) -> str:
    """A cache's size for a person: RunPod's is its size; a Lambda filesystem's is what it holds."""
    if c["cloud"] == "runpod":
        return f"{c['size_gb']} GB"
    used = f"{(c['bytes_used'] or 0) / 1e9:.1f} GB"
    return used + (f" (soft cap {c['size_gb']} GB)" if c.get("size_gb") else "")


# --- tunnel: the session's tunnel to its model server ------------------------------------------


def _tunnel_report(stack: str, t, as_json: bool, text: str) -> None:
    import json as jsonlib

    if as_json:
        print(jsonlib.dumps({"stack": stack, "running": t.running, "port": t.port, "connected": t.connected}))
    else:
        print(text)


@command(name="start", help={"stack": STACK_HELP, "json": "as JSON"})
def tunnel_start(c, stack="dev", json=False):
    """Open the tunnel (it reconnects by itself when the link drops)."""
    from gpu_session.local import tunnel

    t = tunnel.start(stack)
    _tunnel_report(stack, t, json, f"tunnel up: http://127.0.0.1:{t.port}/v1")


@command(name="stop", help={"stack": STACK_HELP, "json": "as JSON"})
def tunnel_stop(c, stack="dev", json=False):
    """Close the tunnel."""
    from gpu_session.local import tunnel

    stopped = tunnel.stop(stack)
    _tunnel_report(stack, tunnel.status(stack), json, "tunnel closed" if stopped else "no tunnel was running")


@command(name="status", help={"stack": STACK_HELP, "json": "as JSON"})
def tunnel_status(c, stack="dev", json=False):
    """Whether the tunnel runs, on which port, and whether it is connected."""
    from gpu_session.local import tunnel

    t = tunnel.status(stack)
    _tunnel_report(
        stack, t, json, f"127.0.0.1:{t.port}: {'connected' if t.connected else 'reconnecting'}" if t.running else "no tunnel"
    )


@command(help={"stack": STACK_HELP, "command": "run this instead of a shell"})
def ssh(c, stack="dev", command=""):
    """A shell on the session's host, with its own key and pinned host key (over the tunnel's connection)."""
    from gpu_session.host.ssh import session_keys, ssh_command
    from gpu_session.local import record

    endpoint = record.load(stack).endpoint  # a stack that is not up: said, and no folder made for it
    argv = ssh_command(session_keys(stack), endpoint) + ([command] if command else [])  # the host's shell parses it
    os.execvp(argv[0], argv)


@command(help={"json": "as JSON"})
def status(c, json=False):
    """Every running session: cloud, GPU, uptime, cost so far, lease left, server health, tunnel; drift flagged."""
    import json as jsonlib

    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    from gpu_session.session.status import interrupted
    from gpu_session.session.status import status as sessions

    _user_config()
    rows, unfinished = sessions(), interrupted()
    if json:
        print(jsonlib.dumps(rows + [{**u, "interrupted": True} for u in unfinished], indent=2))
        return
    for u in unfinished:
        print(f"{u['stack']}: holds {', '.join(u['resources'])}; {u['drift']}")
    if not rows:
        print("no session is running" + (" in the ledger" if unfinished else ""))
        return
    console = Console()
    table = Table("stack", "cloud", "GPU", "up (h)", "USD so far", "lease left (h)", "server", "tunnel", "at the cloud")
    for r in rows:
        table.add_row(r["stack"], r["cloud"], r["gpu"], f"{r['uptime_h']:.2f}", f"{r['cost_so_far']:.4f}",
                      str(r.get("lease_left_h", "?")), r["server"], r["tunnel"], r["cloud_status"])  # fmt: skip
    if Measurement.get(console, console.options.update_width(10_000), table).maximum <= console.width:
        console.print(table)
        for r in rows:
            console.print(f"{r['stack']}: protected by " + "; ".join(r["protections"]), highlight=False)
    else:  # too narrow for the table: a block per session, a line per fact
        for r in rows:
            console.print(_status_block(r), highlight=False)
    for r in rows:
        if r.get("drift"):
            console.print(f"{r['stack']}: {r['drift']}", highlight=False)


def _status_block(r: dict) -> str:
    from rich.markup import escape

    r = {k: escape(v) if isinstance(v, str) else v for k, v in r.items()}  # what hosts and clouds said is not markup
    lease = f"{r['lease_left_h']:.2f} h left" if "lease_left_h" in r else "no lease"
    return "\n".join([
        f"[bold]{r['stack']}[/]: {r['model']} on {r['cloud']} {r['gpu']} ({r['instance_id']})",
        f"  up {r['uptime_h']:.2f} h, ${r['cost_so_far']:.4f} so far at ${r['price_per_hour']:.2f}/h; lease: {lease}",
        f"  server: {r['server']}; tunnel: {r['tunnel']}",
        f"  at the cloud: {r['cloud_status']}",
        "  protected by " + "; ".join(r["protections"]),
    ])  # fmt: skip


@command(help={"hours": "how many hours more", "stack": STACK_HELP, "json": "progress as JSON lines"}, positional=["hours"])
def extend(c, hours, stack="dev", json=False):
    """Move the session's lease end later; the host keeps serving."""
    from gpu_session.session.up import extend as move_lease

    _user_config()
    on_event, say = _printer(json)
    say(f"the lease now ends {move_lease(stack, _number(hours, 'hours'), on_event=on_event)}")


@command(help={"json": "as JSON", "sim": "check against the simulator (started in the background when none runs)"})
def doctor(c, json=False, sim=False):
    """Check this machine: the Pulumi CLI, ssh, the cloud keys (asked of each API), the privacy of config and state files."""
    import json as jsonlib

    from gpu_session.cli import doctor as checks

    _user_config()
    if sim:
        _simulate(_stderr if json else _printer(False)[1])
    results = checks.run()
    if json:
        print(jsonlib.dumps([vars(check) for check in results], indent=2))
    for check in results if not json else []:
        print(f"{'ok ' if check.ok else 'FIX'}  {check.name:<12} {check.detail}")
    if not all(c.ok for c in results if not c.name.endswith(" key")) or not any(c.ok for c in results if c.name.endswith(" key")):
        raise Exit(code=1)


@command(help={"stack": STACK_HELP})
def configure(c, stack="dev"):
    """Run the site playbook again on the session's live host (after a change to the roles, or to repair it)."""
    from gpu_session.session.up import reconfigure

    _user_config()
    _, say = _printer(False)
    reconfigure(stack, say=say)


@command(
    help={
        "from_env": "take the keys from LAMBDA_API_KEY, RUNPOD_API_KEY and HF_TOKEN instead of asking",
        "model": "default model for up", "cloud": "default cloud", "gpu": "default GPU type",
        "hours": "default lease", "budget": "default budget (USD)",
    }
)  # fmt: skip
def setup(c, from_env=False, model="", cloud="", gpu="", hours=None, budget=None):
    """Save API keys (each checked against its API) and defaults in ~/.config/gpu-session/config.yaml (0600)."""
    import getpass

    from gpu_session.local import config

    data = config.load()
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
            raise config.ConfigFileError(f"{e}; nothing was saved") from None
        data[key] = value
    for key, value in (("model", model), ("cloud", cloud), ("gpu", gpu)):
        if value:
            data[key] = value
    for key, value in (("hours", hours), ("budget", budget)):
        if value is not None:
            data[key] = _number(value, key)
    print(f"saved {config.save(data)}")


@command(
    help={
        "backend": "transformers (default: quick) or vllm",
        "cloud": "lambda (default) or runpod",
        "json": "also write the report to this file",
        "cache": "instead: the same model up twice on one cache volume (made and deleted here), the second's phases beside the first's",
    }
)
def bench(c, backend="transformers", cloud="lambda", json="", cache=False):
    """Time one whole session against the simulator: up (provision, configure, server start), the tunnel's first-token overhead, a no-change configure, down."""
    from pathlib import Path

    from gpu_session.cli import bench as benchmark

    _, say = _printer(False)
    _simulate(say)
    report = (benchmark.run_cache if cache else benchmark.run)(backend, cloud, say=say)
    print(benchmark.table(report))
    if json:
        benchmark.save(report, Path(json))


@command(
    help={
        "yes": "terminate (and delete) every orphan without asking",
        "dry_run": "list the orphans and end none (needs no terminal)",
        "json": "progress and the result as JSON lines",
        "sim": "sweep the simulator's clouds (after rehearsals with up --sim)",
    }
)
def sweep(c, yes=False, dry_run=False, json=False, sim=False):
    """Find instances named like ours that no stack owns, and cache volumes no cache stack owns; offer to end them."""
    import json as jsonlib

    from gpu_session.session.cache import CacheError
    from gpu_session.session.down import sweep as sweep_orphans
    from gpu_session.session.down import sweep_volumes

    _user_config()
    _, say = _printer(json)
    if yes and dry_run:
        raise UsageError("--yes ends the orphans and --dry-run ends none: pass one of them")
    if not yes and not dry_run and not sys.stdin.isatty():
        raise UsageError("no terminal to ask before terminating orphans: pass --yes, or --dry-run to list them")
    if sim:
        _simulate(say)
    found = {"instances": [], "volumes": []}

    def confirm(cloud, inst) -> bool:
        found["instances"].append(inst.id)
        say(f"orphan: {cloud} {inst.id} {inst.name} ({inst.raw_status}, ${inst.price_per_hour:.2f}/h)")
        return not dry_run and (yes or _ask("Terminate it?", default=True))

    ended = sweep_orphans(confirm=confirm, say=say)

    def confirm_volume(cloud, volume) -> bool:
        found["volumes"].append(volume.id)
        used = f"{(volume.bytes_used or 0) / 1e9:.1f} GB used" if volume.size_gb is None else f"{volume.size_gb} GB"
        say(f"orphan volume: {cloud} {volume.id} {volume.name} in {volume.region} ({used}), no cache stack here owns it")
        return not dry_run and (yes or _ask("Delete it and what it holds?", default=False))

    try:
        deleted = sweep_volumes(confirm=confirm_volume, say=say)
    except GpuSessionError as e:  # the instances' pass is done; the volumes' could not be: never "no orphans"
        failed = CacheError(f"{e} ({len(ended)} orphan instance(s) terminated before that)")
        failed.summary = {"terminated": ended}  # a --json script still learns which instances were ended
        raise failed from e
    kept = [i for i in found["instances"] if i not in ended] + [v for v in found["volumes"] if v not in deleted]
    if json:
        print(
            jsonlib.dumps({"event": "summary", "ok": True, "terminated": ended, "deleted_volumes": deleted, "kept": kept}),
            flush=True,
        )
    else:
        if ended:
            say(f"{len(ended)} orphan(s) terminated")
        if deleted:
            say(f"{len(deleted)} orphan volume(s) deleted")
        if kept:
            # Still running or held, billing as before (a Lambda filesystem's may be $0): never "no orphans".
            say(f"{len(kept)} orphan(s) left as they are, billing as before: {our_command('sweep --yes')} ends them all, "
                f"{our_command('sweep')} asks of each")  # fmt: skip
        if not found["instances"] and not found["volumes"]:
            say("no orphans")


# --- cache: volumes that outlive sessions (engine venvs, Hub weights) -----------------------------

CACHE_HELP = {
    "cloud": "lambda or runpod",
    "region": "a Lambda region (us-east-1) or a RunPod data center (EU-RO-1)",
    "json": "progress as JSON lines, and the result as the last (a summary event)",
    "sim": "against the cloud simulator (started in the background if none runs)",
}


def _cache_start(json: bool, sim: bool):
    on_event, say = _printer(json)
    _user_config()
    if sim:
        _simulate(say)
    return on_event, say


@command(
    name="create",
    help={
        **CACHE_HELP,
        "size": "GB: a RunPod volume's size (22-4000, default 50: the engine's install takes 21.5 GB, the weights "
        "the rest); on Lambda, whose filesystems grow, a soft cap",
    },
)
def cache_create(c, cloud="", region="", size=None, json=False, sim=False):
    """Make a cache volume in a region (or adopt ours already there): sessions there keep the engine and the weights on it."""
    import json as jsonlib

    from gpu_session.session import cache

    if not cloud or not region:
        raise UsageError("which cache? --cloud lambda|runpod --region REGION")
    cache.check(cloud, region, size)  # bad input: before the simulator starts or anything is asked
    on_event, say = _cache_start(json, sim)
    info = cache.create(cloud, region, size, say=say, on_event=on_event)
    if json:
        print(jsonlib.dumps({"event": "summary", "ok": True, "cache": info.as_json()}), flush=True)
    else:
        say(f"it bills ${info.monthly_usd:.2f}/month now ({info.price_per_gb_month:.2f} USD per GB-month, "
            f"{'on its size' if info.cloud_sized else 'on what it holds'}) until {info.rm_command}")  # fmt: skip


@command(name="list", help={"json": "as JSON", "sim": CACHE_HELP["sim"]})
def cache_list(c, json=False, sim=False):
    """The cache volumes of this machine: cloud, region, size, used, monthly USD, in use by."""
    import json as jsonlib

    from rich.console import Console
    from rich.table import Table

    from gpu_session.session.cache import GB, caches, total_text

    _cache_start(False, sim)
    found = caches()
    if json:
        print(jsonlib.dumps([c.as_json() for c in found], indent=2))
        return
    if not found:
        print(f"no cache volume: {our_command('cache create --cloud C --region R')} makes one")
        return
    table = Table("cloud", "region", "size", "used", "USD/month", "in use by", "volume")
    for i in found:
        size = f"{i.size_gb} GB" if i.cloud_sized else (f"cap {i.size_gb} GB" if i.size_gb else "grows")
        # RunPod's API does not say what a volume holds; a cloud that did not answer said nothing.
        used = f"{i.bytes_used / GB:.1f} GB" if i.bytes_used is not None else "not reported" if i.answered else "unknown"
        users = ", ".join(i.in_use_by) or ("an instance" if i.in_use else "")
        usd = "unknown" if i.monthly_usd is None else f"{i.monthly_usd:.2f}"
        table.add_row(i.cloud, i.region, size, used, usd, users, i.volume_id)
    Console().print(table)
    for i in found:  # below the table, whole: a column would cut what to do
        if i.note:
            print(f"{i.cloud} {i.region}: {i.note}")
    print(f"in all: {total_text([i.monthly_usd for i in found])}, whether a session runs or not")


@command(name="rm", help={**CACHE_HELP, "yes": "do not ask"})
def cache_rm(c, cloud="", region="", yes=False, json=False, sim=False):
    """Delete a cache volume and what it holds (refused while a session uses it); says the monthly cost it stops."""
    import json as jsonlib

    from gpu_session.session import cache

    if not cloud or not region:
        raise UsageError(f"which cache? --cloud lambda|runpod --region REGION ({our_command('cache list')} shows them)")
    cache.check(cloud, region, creating=False)
    on_event, say = _cache_start(json, sim)
    if not yes:
        info = cache.find(cloud, region)  # a cache that is not here is said first: --yes would not help
        if info is None:
            raise cache.CacheError(f"no cache {cloud} {region} here: {our_command('cache list')} shows them")
        cache.check_deletable(info)  # said before asking: --yes would not change it
        if not sys.stdin.isatty():
            raise UsageError("no terminal to ask whether to delete the cache: pass --yes")
        if not _ask(f"Delete cache {info.describe()} and everything on it?", default=False):
            say("kept")
            return
    info = cache.rm(cloud, region, say=say, on_event=on_event)
    if json:
        print(
            jsonlib.dumps({"event": "summary", "ok": True, "deleted": info.as_json(), "monthly_usd_stopped": info.monthly_usd}),
            flush=True,
        )


@command(help={"cloud": "lambda, runpod or auto (every cloud you have a key for)", "json": "as JSON"})
def available(c, cloud="auto", json=False):
    """GPU offers with their prices and where they have capacity now."""
    import json as jsonlib

    from rich.console import Console
    from rich.table import Table

    from gpu_session.session.status import available as offers_now

    _user_config()
    offers = offers_now(cloud)
    if json:
        print(
            jsonlib.dumps(
                [vars(o) | {"total_vram_gb": o.total_vram_gb, "catalog_models_that_fit": fits} for o, fits in offers], indent=2
            )
        )
        return
    table = Table("cloud", "GPU", "type", "GPUs", "memory", "$/h", "capacity", "catalog models that fit")
    for o, fits in offers:
        table.add_row(o.cloud, o.gpu_name, o.instance_type, str(o.gpu_count), f"{o.total_vram_gb} GB", f"{o.price_per_hour:.2f}",
                      ", ".join(o.regions) or "none", ", ".join(fits))  # fmt: skip
    Console().print(table)


@command(help={"json": "as JSON"})
def cost(c, json=False):
    """What the sessions cost: each one, per month, and in all; and what the cache volumes bill a month."""
    import json as jsonlib

    from rich.console import Console
    from rich.table import Column, Table

    from gpu_session.local.ledger import Ledger
    from gpu_session.session.cache import caches as cache_volumes
    from gpu_session.session.cache import monthly_text, total_text

    _user_config()
    ledger = Ledger()
    try:
        kept = [c.as_json() for c in cache_volumes()]
    except GpuSessionError as e:
        kept, unknown = [], str(e)
    else:
        unknown = ""
    bills = [c["monthly_usd"] for c in kept]
    monthly = None if None in bills else round(sum(bills), 2)  # unknown when a cache's cloud did not answer
    deleted = ledger.deleted_caches()
    if json:
        sessions = [vars(s) | {"hours": s.hours, "cost": s.cost} for s in ledger.sessions()]
        print(jsonlib.dumps({"sessions": sessions, "by_month": ledger.by_month(), "total": ledger.total(),
                             "caches": kept, "caches_monthly_usd": monthly, "deleted_caches": deleted,
                             **({"caches_error": unknown} if unknown else {})}, indent=2))  # fmt: skip
        return
    # A model's whole name, folded on a narrow terminal: two models may differ only at its end.
    table = Table("stack", "cloud", "GPU", Column("model", overflow="fold"), "hours", "USD", "state")
    for s in ledger.sessions():
        table.add_row(
            s.stack, s.cloud, s.gpu, s.model, f"{s.hours:.2f}", f"{s.cost:.4f}", "running" if s.ended_at is None else "ended"
        )
    Console().print(table)
    for month, spent in ledger.by_month().items():
        print(f"{month}: {spent:.4f} USD")
    print(f"total: {ledger.total():.4f} USD")
    for c in kept:
        so_far = f", ≈ ${c['so_far_usd']:.2f} so far since {c['created_at'][:10]}" if c.get("so_far_usd") is not None else ""
        print(f"cache {c['cloud']} {c['region']}: {_cache_size(c) if c['exists'] else c.get('note') or 'gone at the cloud'}, "
              f"{monthly_text(c['monthly_usd'])}{so_far}")  # fmt: skip
    if kept:
        print(f"caches: {total_text(bills)}, whether a session runs or not")
    if deleted:
        spent = sum(d["cost"] or 0 for d in deleted)
        print(f"deleted caches: {len(deleted)}, ≈ ${spent:.2f} in all while they were kept")
    if unknown:
        print(f"caches: unknown ({unknown})")


ns = Collection(test, sim, engines, up, chat, down, ssh, status, extend, doctor, configure, setup, bench, sweep, available, cost)
# A collection's name alone runs its look-only task (`gpu-session cache` lists, as `git remote` does).
for name, default, others in (
    ("history", history_list, (history_show, history_export, history_purge)),
    ("tunnel", tunnel_status, (tunnel_start, tunnel_stop)),
    ("cache", cache_list, (cache_create, cache_rm)),
):
    group = Collection(name, *others)
    group.add_task(default, default=True)
    ns.add_collection(group)
