"""Runs our playbooks and roles on a host through ansible-runner: inventory from an SSH endpoint,
a pinned known_hosts, progress as events, failures as one clear error.

Everything ansible-runner writes (inventory, extra vars, which may hold secrets, artifacts) lives in
a 0700 folder under the state dir that is deleted when the run ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gpu_session.errors import GpuSessionError, in_our_words
from gpu_session.paths import ASSETS, private_dir, state_dir, write_private


@dataclass
class Target:
    """The host to configure, as SSH reaches it."""

    host: str
    port: int
    user: str
    private_key: Path
    known_hosts: Path  # pinned host keys; a host missing from it is refused
    python: str = "/usr/bin/python3"
    name: str = "gpu"


@dataclass
class Event:
    kind: str  # "task" (a task started), "ok", "changed", "failed", "skipped", "retry" (an until loop's try)
    task: str
    message: str = ""
    seconds: float = 0.0  # how long the task took on this host (ok, changed, failed)


@dataclass
class RunResult:
    ok: bool
    changed: int  # the tasks that changed something, as the play's recap counts them (no_log tasks too)
    facts: dict = field(default_factory=dict)
    failures: list[Event] = field(default_factory=list)
    strategy: str = "linear"  # the play's Ansible strategy (ANSIBLE_STRATEGY): mitogen_linear, …


# Mitogen's strategies run a play's modules in one Python per host kept over the SSH connection,
# rather than a module sent and started per task (README: Faster configure with Mitogen). Chosen as
# any strategy is, with Ansible's own ANSIBLE_STRATEGY; we only say where they are when installed.


def is_mitogen(strategy: str) -> bool:
    """Whether an ANSIBLE_STRATEGY value names one of Mitogen's strategies (mitogen, mitogen_linear,
    mitogen_free, mitogen_host_pinned)."""
    return strategy == "mitogen" or strategy.startswith("mitogen_")


def strategy_plugins() -> str | None:
    """The folder of Mitogen's strategy plugins (the `mitogen` package's ansible_mitogen), or None
    when it is not installed."""
    try:
        import ansible_mitogen
    except ImportError:
        return None
    return str(Path(ansible_mitogen.__file__).parent / "plugins" / "strategy")


def controller_uv(binary: Path | None = None) -> list[str]:
    """The controller's uv as host_base's "Read the controller's uv" looks it up: the lines of
    `uname -sm`, `uv --version`, `sha256sum < uv` and `wc -c < uv` (["Linux x86_64"] alone when
    there is no uv; `binary`: the uv beside this Python, host_base_uv_binary's default). Computed
    once per binary: the version, hash and size are kept in the state dir under the file's path,
    size, mtime and inode, so a converge does not read 38 MB again (a second or more where the page
    cache lost it: a host's model load evicts it)."""
    import hashlib
    import platform

    binary = binary or Path(sys.executable).with_name("uv")
    system = f"{platform.system()} {platform.machine()}"
    kept = state_dir() / "controller-uv.json"
    try:
        with binary.open("rb") as f:
            st = os.fstat(f.fileno())  # the key, the size and the hash: all of the file opened
            key = [str(binary), st.st_size, st.st_mtime_ns, st.st_ino]
            try:
                known = json.loads(kept.read_text())
                if known["key"] == key:
                    return [system, *known["lines"]]
            except (OSError, ValueError, KeyError, TypeError):
                pass
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return [system]
    if not version:
        return [system]
    lines = [version, f"{digest}  -", str(st.st_size)]
    with contextlib.suppress(OSError):  # not kept (a full disk): hashed again next time
        write_private(kept, json.dumps({"key": key, "lines": lines}))
    return [system, *lines]


def check_strategy(environ: dict[str, str] | None = None) -> None:
    """Before anything is launched: ANSIBLE_STRATEGY naming one of Mitogen's strategies needs it
    installed. Raises MitogenMissing."""
    strategy = (os.environ if environ is None else environ).get("ANSIBLE_STRATEGY", "")
    if is_mitogen(strategy) and strategy_plugins() is None:
        raise MitogenMissing(
            f"ANSIBLE_STRATEGY={strategy} is one of Mitogen's strategies, which are not installed: "
            "pip install 'gpu-session[mitogen]', or unset ANSIBLE_STRATEGY"
        )


class MitogenMissing(GpuSessionError, RuntimeError):
    """ANSIBLE_STRATEGY names a Mitogen strategy and Mitogen is not installed."""


class ConfigureError(GpuSessionError, RuntimeError):
    """A play failed; the message names the task and says what went wrong."""

    def __init__(self, result: RunResult):
        self.result = result
        detail = "; ".join(f"{f.task}: {f.message}" for f in result.failures) or "ansible-playbook failed"
        super().__init__(in_our_words(detail))


def inventory_yaml(target: Target) -> str:
    """The target as an Ansible inventory (templates/inventory.yml.j2): what runs use, and what a
    person can save as inventory/<stack>.yml to run the playbooks by hand."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["quote"] = shlex.quote
    return env.from_string((ASSETS / "templates" / "inventory.yml.j2").read_text()).render(
        {k: str(v) for k, v in vars(target).items()}
    )


def _inventory(target: Target) -> dict:
    """The rendered inventory plus the shared variables of inventory/group_vars/all.yml (runner's
    inventory lives elsewhere, so Ansible would not find that folder by itself)."""
    import yaml

    inventory = yaml.safe_load(inventory_yaml(target))
    inventory["all"]["vars"] = yaml.safe_load((ASSETS / "inventory" / "group_vars" / "all.yml").read_text()) or {}
    return inventory


def _message(result: dict) -> str:
    if result.get("_ansible_no_log"):
        return "(details hidden: the task handles secrets)"
    failed_items = [r for r in result.get("results") or [] if isinstance(r, dict) and r.get("failed")]
    if failed_items:  # a loop: what went wrong with each item, not "One or more items failed"
        return "; ".join(_message(r) for r in failed_items)
    msg = str(result.get("msg") or "")
    stderr = str(result.get("stderr") or "").strip()
    if stderr and msg in ("", "non-zero return code"):  # a failed command: its own last words say why
        msg = stderr.splitlines()[-1]
    return (msg or str(result.get("module_stderr") or "")).strip()


def remove_orphaned_runs() -> None:
    """A run killed outright (kill -9, a crash) leaves its folder, extra vars and all: remove those
    whose process is gone, and end what Ansible left running of them (end_run_processes). Every run
    does this first, and so does `down`."""
    for folder in (state_dir() / "runs").glob("ansible-*-*"):
        pid = folder.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            end_run_processes(folder)
            shutil.rmtree(folder, ignore_errors=True)


def end_run_processes(private: Path) -> list[int]:
    """SIGKILL every process of the run whose private folder is `private` (its command line names
    it: ansible-playbook's -i and -e), with its process group; the pids ended. ansible-runner ends a
    cancelled run by killing ansible-playbook's process group, but each of Ansible's workers calls
    setsid (ansible/executor/process/worker.py, _detach): a worker that outlives its playbook then
    blocks for ever writing its result into a queue nobody reads. Linux only (/proc); elsewhere none."""
    mark = f"{private}{os.sep}".encode()
    ended = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            pid = int(cmdline.parent.name)
            if pid == os.getpid() or mark not in cmdline.read_bytes():
                continue
            if os.getpgid(pid) == pid:  # a worker leads its own group: what it started goes with it
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
            ended.append(pid)
        except (OSError, ValueError):  # gone meanwhile, or not ours to signal
            continue
    return ended


def run(
    target: Target,
    *,
    playbook: str | None = None,
    role: str | None = None,
    extravars: dict | None = None,
    on_event: Callable[[Event], None] | None = None,
    strategy: str | None = None,
) -> RunResult:
    """Run a playbook (a path under playbooks/) or a single role on the target, with Ansible's
    `strategy` when given, else the one ANSIBLE_STRATEGY chooses (Ansible's linear when Mitogen's is
    chosen and not installed). Raises ConfigureError."""
    import ansible_runner

    if (playbook is None) == (role is None):
        raise ValueError("give exactly one of playbook or role")
    runs = private_dir(state_dir() / "runs")
    remove_orphaned_runs()
    private = Path(tempfile.mkdtemp(prefix=f"ansible-{os.getpid()}-", dir=runs))  # mkdtemp: 0700
    control = tempfile.mkdtemp(prefix="gs-cp-")
    failures: list[Event] = []
    facts: dict = {}  # what set_fact tasks set: the roles' published results
    changed = 0
    said: list[str] = []

    def handle(event: dict) -> bool:
        nonlocal changed
        data = event.get("event_data") or {}
        task = data.get("task") or ""
        kind = event.get("event", "")
        if kind == "playbook_on_task_start":
            emit(Event("task", task))
        elif kind in ("runner_on_failed", "runner_on_unreachable") and not data.get("ignore_errors"):
            failure = Event("failed", task, _message(data.get("res") or {}))
            failures.append(failure)
            emit(failure)
        elif kind in ("verbose", "error") and event.get("stdout", "").strip():
            # Ansible's own words outside any task: a playbook that does not parse, a missing command.
            said.append(re.sub(r"\x1b\[[0-9;]*m", "", event["stdout"]).strip())
        elif kind == "runner_retry" and not (data.get("res") or {}).get("_ansible_no_log"):
            emit(Event("retry", task, str((data.get("res") or {}).get("stdout") or "")))  # what the try printed
        elif kind == "playbook_on_stats":
            # The play's count: a no_log task's result reaches us censored, without its "changed".
            changed = sum((data.get("changed") or {}).values())
        elif kind == "runner_on_skipped":
            emit(Event("skipped", task))  # a phase whose first task is skipped has nothing to do (converge)
        elif kind == "runner_on_ok":
            res = data.get("res") or {}
            if data.get("task_action", "").endswith("set_fact") and not res.get("_ansible_no_log"):
                facts.update(res.get("ansible_facts") or {})
            printed = "" if res.get("_ansible_no_log") else str(res.get("stdout") or "")  # a command's output, for converge
            emit(
                Event("changed" if res.get("changed") else "ok", task, printed, seconds=float(data.get("duration") or 0))
            )  # a no_log task's result comes censored: reported "ok" (the recap counts it changed)
        return False  # keep nothing in the artifacts: they may hold task results

    def emit(event: Event) -> None:
        if on_event is not None:
            on_event(event)

    env = {
        # ansible-runner turns host key checking off unless told otherwise; ssh then honours the
        # first StrictHostKeyChecking it sees (Ansible's "no"), and a stranger would be trusted.
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_CONFIG": str(ASSETS / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(ASSETS / "roles"),
        # Unix sockets allow ~100 bytes of path: the control sockets (no secrets in them) go in a short folder.
        "ANSIBLE_SSH_CONTROL_PATH_DIR": control,
        "ANSIBLE_LOCAL_TEMP": str(private / "tmp"),
        # ansible-playbook sits beside this Python, even when its venv is not activated.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    if (plugins := strategy_plugins()) is not None:  # chosen only by ANSIBLE_STRATEGY, if at all
        env["ANSIBLE_STRATEGY_PLUGINS"] = os.pathsep.join(p for p in (plugins, os.environ.get("ANSIBLE_STRATEGY_PLUGINS")) if p)
    if strategy is not None:
        env["ANSIBLE_STRATEGY"] = strategy
    elif is_mitogen(os.environ.get("ANSIBLE_STRATEGY", "")) and plugins is None:
        # up refused this before launch (check_strategy); extend, reconfigure and down run, Ansible's way.
        env["ANSIBLE_STRATEGY"] = "linear"
    try:
        parent = os.getppid()
        kwargs = dict(
            # Whoever started us is gone (a killed engine, a closed terminal): stop the play rather
            # than go on changing a host for nobody.
            cancel_callback=lambda: os.getppid() != parent,
            private_data_dir=str(private),
            inventory=json.dumps(_inventory(target)),
            # The controller's uv, as host_base would look it up (kept between runs: controller_uv).
            extravars={
                **({} if "host_base_uv_binary" in (extravars or {}) else {"host_base_controller_uv": controller_uv()}),
                **(extravars or {}),
            },  # fmt: skip
            envvars=env,
            event_handler=handle,
            quiet=True,
            suppress_env_files=False,
        )
        if playbook is not None:
            r = ansible_runner.run(playbook=str(ASSETS / "playbooks" / playbook), **kwargs)
        else:
            # No fact gathering up front: a role gathers what it needs, after making sure python3 exists.
            r = ansible_runner.run(role=role, roles_path=str(ASSETS / "roles"), hosts=target.name, role_skip_facts=True, **kwargs)
        strategy = env.get("ANSIBLE_STRATEGY") or os.environ.get("ANSIBLE_STRATEGY") or "linear"
        result = RunResult(r.status == "successful" and r.rc == 0, changed, facts, failures, strategy)
        if not result.ok and not failures:
            failures.append(Event("failed", "ansible", " ".join(said[-3:]) or f"ansible-playbook exited {r.rc}"))
    finally:
        end_run_processes(private)  # a cancelled run's workers (see there); none after a run that ended
        shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(control, ignore_errors=True)
    if not result.ok:
        raise ConfigureError(result)
    return result
