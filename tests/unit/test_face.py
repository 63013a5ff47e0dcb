"""The face's one error boundary and its flags, as a person meets them: bad input is one line on
stderr that says what to do, exit code 1, no traceback, and nothing changed."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_session.paths import state_dir

ROOT = Path(__file__).resolve().parents[2]
INVOKE = str(Path(sys.executable).parent / "invoke")


def invoke(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAMBDA_", "RUNPOD_"))}
    return subprocess.run(
        [INVOKE, *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args, said",
    [
        (["up", "--model", "gpu-session/tiny-chat", "--gpus", "two"], "error: --gpus takes a number (got 'two')"),
        (["up", "--model", "gpu-session/tiny-chat", "--stack", "no/such"], "error: invalid stack name 'no/such'"),
        (
            ["up", "--model", "gpu-session/tiny-chat", "--yes"],
            "error: no cloud API key: export LAMBDA_API_KEY or RUNPOD_API_KEY (`invoke setup` saves them),"
            " or pass --sim to use the simulator",
        ),
        (["extend", "many"], "error: --hours takes a number (got 'many')"),
        (["chat", "--stack", "never-up", "--prompt", "hi"], "error: stack never-up is not up"),
        (["tunnel.start", "--stack", "never-up"], "error: stack never-up is not up"),
        (["history.purge", "--stack", "kept"], "error: no terminal to ask whether to delete the history: pass --yes"),
        (["sweep"], "error: no terminal to ask before terminating orphans: pass --yes, or --dry-run to list them"),
        (["sweep", "--yes", "--dry-run"], "error: --yes ends the orphans and --dry-run ends none: pass one of them"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(args, said):
    done = invoke(*args)
    assert done.returncode == 1 and done.stderr.startswith(said), done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (state_dir() / "stacks" / "never-up").exists()  # a look at a stack that never was leaves no folder


def test_looking_at_the_tunnel_of_no_session_leaves_nothing():
    done = invoke("tunnel.status", "--stack", "never-looked-at")
    assert done.returncode == 0 and "no tunnel" in done.stdout + done.stderr, done.stderr
    assert not (state_dir() / "stacks" / "never-looked-at").exists()


@pytest.mark.parametrize(
    "args, said",
    [
        (["cache.rm", "--json"], "which cache? --cloud lambda|runpod --region REGION"),
        (["cache.create", "--cloud", "aws", "--region", "us-east-1", "--json"], "aws"),
        (["down", "--stack", "no/such", "--json"], "invalid stack name 'no/such'"),
    ],
)
def test_a_failure_under_json_ends_with_a_failed_summary(args, said):
    """A script reading the last line of `--json` learns that the command failed, and why."""
    done = invoke(*args)
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 1 and last["event"] == "summary" and last["ok"] is False and said in last["error"], done.stdout
    assert done.stderr.startswith(f"error: {last['error']}")


def test_a_dry_run_refused_before_its_plan_prints_its_one_object():
    done = invoke("up", "--model", "gpu-session/tiny-chat", "--hours", "abc", "--dry-run", "--json")
    assert done.returncode == 1 and json.loads(done.stdout) == {"ok": False, "error": "--hours takes a number (got 'abc')"}


def test_a_refused_purge_deletes_nothing():
    from gpu_session.chat.history import Conversation, History

    history = History("kept")
    history.save(Conversation(model="gpu-session/tiny-chat", messages=[{"role": "user", "content": "hi"}]))
    assert invoke("history.purge", "--stack", "kept").returncode == 1
    assert len(history.ids()) == 1
    purged = invoke("history.purge", "--stack", "kept", "--yes")
    assert purged.returncode == 0 and history.ids() == []


def test_every_option_has_a_name_a_person_can_type():
    """Invoke's automatic short flags gave `--cache-gated` the dash as its short flag (`--`)."""
    from gpu_session.cli.tasks import ns

    def tasks(collection):
        yield from collection.tasks.values()
        for sub in collection.collections.values():
            yield from tasks(sub)

    for task in tasks(ns):
        for argument in copy.deepcopy(task).get_arguments():  # a copy: get_arguments pops the task's help
            assert all(name.replace("-", "").isalnum() for name in argument.names), (task.name, argument.names)
    assert "  --cache-gated  " in invoke("--help", "up").stdout


def test_sub_actions_are_tasks_and_reporting_commands_take_json():
    listed = invoke("--list").stdout
    for name in (
        "tunnel.start",
        "tunnel.stop",
        "tunnel.status",
        "history.list",
        "history.show",
        "history.export",
        "history.purge",
    ):
        assert name in listed
    for command in ("status", "cost", "available", "sweep", "doctor", "history.list", "tunnel.status", "up", "down", "extend"):
        assert "--json" in invoke("--help", command).stdout, command
    for command in ("up", "down", "chat", "sweep", "history.purge"):
        assert "--yes" in invoke("--help", command).stdout, command
    assert invoke("tunnel", "start").returncode != 0  # the old spelling is not half-accepted
    alone = invoke("cache")  # a group's name alone is its look-only task: the list
    assert alone.returncode == 0 and "no cache volume" in alone.stdout + alone.stderr, alone.stderr


def test_up_json_ends_with_a_summary_of_plain_outputs_and_the_endpoint():
    from gpu_session.cli.tasks import _up_summary

    assert _up_summary("dev", {}) == {"stack": "dev", "launched": False}  # declined
    outputs = {"instance_id": "i-1", "cloud": "lambda", "model": "m", "session_dir": "/s", "tunnel_port": 4242,
               "hf_token": "hf_secret", "something_new": "x"}  # fmt: skip
    summary = _up_summary("dev", outputs)
    assert summary == {"stack": "dev", "launched": True, "instance_id": "i-1", "cloud": "lambda", "model": "m",
                       "session_dir": "/s", "tunnel_port": 4242, "endpoint": "http://127.0.0.1:4242/v1",
                       "api_key_file": "/s/api_key"}  # fmt: skip


def test_messages_name_our_commands_as_the_person_runs_them(monkeypatch):
    """In a checkout `invoke X` (a collection's task dotted: Invoke takes no other form); where the
    installed script ran (it sets GPU_SESSION_COMMAND for itself and its children) `gpu-session X`."""
    from gpu_session.cli import tasks
    from gpu_session.errors import COLLECTIONS, COMMAND_ENV, SIM_ENV, our_command

    assert set(COLLECTIONS) == set(tasks.ns.collections)
    monkeypatch.delenv(COMMAND_ENV, raising=False)
    assert our_command("cache rm --cloud lambda --region us-east-1") == "`invoke cache.rm --cloud lambda --region us-east-1`"
    assert our_command("down --stack dev", quoted=False) == "invoke down --stack dev"
    assert our_command("cache list") == "`invoke cache.list`"
    monkeypatch.setenv(COMMAND_ENV, "gpu-session")
    assert our_command("cache rm --cloud lambda --region us-east-1") == "`gpu-session cache rm --cloud lambda --region us-east-1`"
    assert our_command("sweep --sim --yes") == "`gpu-session sweep --sim --yes`"
    monkeypatch.setenv(SIM_ENV, "1")  # a rehearsal (--sim): the commands that take --sim name it, once
    assert (
        our_command("cache rm --cloud lambda --region us-east-1")
        == "`gpu-session cache rm --cloud lambda --region us-east-1 --sim`"
    )
    assert our_command("sweep --sim --yes") == "`gpu-session sweep --sim --yes`"
    assert our_command("chat --stack dev") == "`gpu-session chat --stack dev`"  # chat finds its session's simulator itself
    assert our_command("cache rm --cloud x --region y --sim") == "`gpu-session cache rm --cloud x --region y --sim`"
    monkeypatch.delenv(COMMAND_ENV)  # a rehearsal in a checkout: dotted, and --sim kept
    assert our_command("cache rm --cloud x --region y") == "`invoke cache.rm --cloud x --region y --sim`"
    assert our_command("cache list") == "`invoke cache.list --sim`"


def test_the_roles_failures_name_our_commands_as_the_person_runs_them(monkeypatch):
    """The roles name the installed script (a person running them by hand has it); their failures
    reach a person of a checkout as `invoke X`. The text is the scrub role's own."""
    import yaml

    from gpu_session.errors import COMMAND_ENV
    from gpu_session.host.ansible import ConfigureError, Event, RunResult

    tasks = yaml.safe_load((ROOT / "roles" / "scrub" / "tasks" / "verify.yml").read_text())
    said = next(t["ansible.builtin.fail"]["msg"] for t in tasks if t["name"] == "Fail when a canary survived on the cache volume")
    failed = RunResult(ok=False, changed=0, failures=[Event("failed", "Fail when a canary survived", said)])
    monkeypatch.delenv(COMMAND_ENV, raising=False)
    words = str(ConfigureError(failed))
    assert "`invoke ssh`" in words and "`invoke down`" in words and "`invoke cache.rm`" in words, words
    assert "gpu-session" not in words, words
    monkeypatch.setenv(COMMAND_ENV, "gpu-session")
    assert "`gpu-session cache rm`" in str(ConfigureError(failed))


def test_the_installed_script_names_itself_in_its_messages():
    script = [sys.executable, "-c", "from gpu_session.cli import main; main()"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAMBDA_", "RUNPOD_", "GPU_SESSION_COMMAND"))}
    for argv, said in (
        (
            ["chat", "--stack", "never-up", "--prompt", "hi"],
            "error: stack never-up is not up: `gpu-session up --stack never-up` first",
        ),
        (["cache", "rm", "--cloud", "runpod", "--region", "EU-RO-9"], "`gpu-session cache list` shows them"),
    ):
        done = subprocess.run(
            [*script, *argv], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 1 and said in done.stderr, done.stderr
