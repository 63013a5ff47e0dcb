"""The record of a live session: what `up` learnt from the stack's outputs (the host, its SSH
endpoint, the model, the rate, the lease) and where its cloud was (the API and Hub addresses in
the environment `up` ran in: the simulator's, or none for the real ones), kept in the stack's folder
so that status, the tunnel, ssh, the chat, the watch and down read it without asking the engine
and work from any shell. It holds no secret (the stack's keys stay in its encrypted config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from gpu_session.clouds import API_BASE_ENV
from gpu_session.errors import GpuSessionError, our_command
from gpu_session.host.ssh import Endpoint
from gpu_session.paths import stack_dir, write_private

FILE = "session.json"
# Where a session's cloud and Hub were: the clients' address settings (clouds.API_BASE_ENV and the
# Hub's), and what the hosts of a cloud without internet install from. No key is among them.
ENVIRONMENT = (
    *API_BASE_ENV.values(),
    "RUNPOD_REST_API_BASE_URL",  # RunPod's REST API, for its network volumes (clouds.runpod)
    "HF_ENDPOINT",
    "GPU_SESSION_HOST_WHEELHOUSE",
    "GPU_SESSION_HOST_VENVS",
    "GPU_SESSION_DEVICE",
)


class NotUp(GpuSessionError):
    """The stack has no live session on this machine."""


@dataclass(frozen=True)
class LiveSession:
    """One stack's session, typed: the program's outputs (infra/__main__.py) as `up` got them."""

    stack: str
    cloud: str
    instance_id: str
    endpoint: Endpoint
    gpu: str
    gpu_count: int
    price_per_hour: float  # USD/h
    model: str  # the Hub id
    backend: str  # vllm or transformers
    served_model_name: str
    lease_expires_at: datetime | None  # None: no lease (`up --no-configure` keeps one too; older records may not)
    session_dir: Path
    environment: dict[str, str]  # ENVIRONMENT's variables as `up` had them

    @classmethod
    def of(cls, stack: str, outputs: dict, environment: dict[str, str] | None = None) -> LiveSession:
        """From the stack's outputs (KeyError when one the program always exports is missing)."""
        expires = outputs.get("lease_expires_at")
        return cls(
            stack=stack, cloud=outputs["cloud"], instance_id=outputs["instance_id"], endpoint=Endpoint.of(outputs),
            gpu=outputs.get("gpu") or "", gpu_count=int(outputs.get("gpu_count") or 1),
            price_per_hour=float(outputs["price_per_hour"]), model=outputs["model"], backend=outputs["backend"],
            served_model_name=outputs["served_model_name"],
            lease_expires_at=datetime.fromisoformat(expires) if expires else None,
            session_dir=Path(outputs.get("session_dir") or stack_dir(stack)),
            environment={k: v for k, v in (environment or {}).items() if k in ENVIRONMENT},
        )  # fmt: skip

    def lease_left_h(self, now: datetime | None = None) -> float | None:
        """Hours until the lease ends (negative: it has ended), or None without one."""
        if self.lease_expires_at is None:
            return None
        now = now or datetime.now(self.lease_expires_at.tzinfo)
        return (self.lease_expires_at - now).total_seconds() / 3600

    @property
    def api_key_file(self) -> Path:
        """The model server's API key (0600), which converge made on the first configure."""
        return stack_dir(self.stack) / "api_key"


def save(stack: str, outputs: dict, environment: dict[str, str]) -> LiveSession:
    """Keep the stack's outputs, and where its cloud is (ENVIRONMENT's variables found in
    `environment`), as its live session's record (0600)."""
    session = LiveSession.of(stack, outputs, environment)
    write_private(stack_dir(stack) / FILE, json.dumps({"outputs": outputs, "environment": session.environment}))
    return session


def remember_environment(stack: str, environment: dict[str, str]) -> None:
    """Before anything is launched: where the stack's cloud is, so that `down` finds it from any
    shell even when `up` fails or is killed before its outputs exist."""
    write_private(
        stack_dir(stack) / FILE, json.dumps({"environment": {k: v for k, v in environment.items() if k in ENVIRONMENT}})
    )


def environment_of(stack: str) -> dict[str, str]:
    """Where the stack's cloud was (ENVIRONMENT's variables), live session or not; {} when unknown."""
    path = stack_dir(stack, create=False) / FILE
    return json.loads(path.read_text()).get("environment") or {} if path.exists() else {}


def load(stack: str) -> LiveSession:
    """The stack's live session; NotUp (saying what to do) when there is none on this machine."""
    found = find(stack)
    if found is None:
        raise NotUp(f"stack {stack} is not up: {our_command(f'up --stack {stack}')} first")
    return found


def find(stack: str) -> LiveSession | None:
    """The stack's live session, or None."""
    path = stack_dir(stack, create=False) / FILE
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return LiveSession.of(stack, saved["outputs"], saved["environment"]) if "outputs" in saved else None
