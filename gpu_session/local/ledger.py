"""The cost ledger: every session's machine, rate, start and end, and what each deleted cache volume
cost while it was kept, in SQLite under the state dir (0600).

A session is opened when its instance exists and closed by `down` (or `sweep`) with the cost
worked out from the rate and the time it ran, so the ledger can say what was spent per session, per
month and in all, and how much of a budget is left.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gpu_session.paths import private_dir, state_dir

from . import record

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY,
    stack TEXT NOT NULL,
    cloud TEXT NOT NULL,
    instance_id TEXT NOT NULL UNIQUE,
    gpu TEXT NOT NULL,
    model TEXT NOT NULL,
    price_per_hour REAL NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    budget REAL
);
CREATE TABLE IF NOT EXISTS deleted_caches (
    id INTEGER PRIMARY KEY,
    cloud TEXT NOT NULL,
    region TEXT NOT NULL,
    volume_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    deleted_at REAL NOT NULL,
    cost REAL
)
"""


@dataclass(frozen=True)
class Entry:
    """One session in the ledger: its machine, rate, start and end (time.time() seconds), budget (USD)."""

    stack: str
    cloud: str
    instance_id: str
    gpu: str
    model: str
    price_per_hour: float
    started_at: float
    ended_at: float | None = None
    budget: float | None = None

    @property
    def hours(self) -> float:
        return max(0.0, ((self.ended_at or time.time()) - self.started_at) / 3600)

    @property
    def cost(self) -> float:
        return round(self.hours * self.price_per_hour, 4)

    @property
    def month(self) -> str:
        return datetime.fromtimestamp(self.started_at, UTC).strftime("%Y-%m")


class Ledger:
    def __init__(self, path: Path | None = None):
        self.path = path or state_dir() / "ledger.db"
        private_dir(self.path.parent)
        new = not self.path.exists()
        self.db = sqlite3.connect(self.path)
        if new:
            self.path.chmod(0o600)
        self.db.executescript(SCHEMA)

    def open(self, s: Entry) -> None:
        """Record a running instance (again: an adopted one keeps its first start)."""
        with self.db:
            self.db.execute(
                "INSERT OR IGNORE INTO sessions (stack, cloud, instance_id, gpu, model, price_per_hour, started_at, budget)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (s.stack, s.cloud, s.instance_id, s.gpu, s.model, s.price_per_hour, s.started_at, s.budget),
            )

    def close(self, instance_id: str, ended_at: float | None = None) -> Entry | None:
        with self.db:
            self.db.execute(
                "UPDATE sessions SET ended_at = ? WHERE instance_id = ? AND ended_at IS NULL",
                (ended_at or time.time(), instance_id),
            )
        return self.get(instance_id)

    def get(self, instance_id: str) -> Entry | None:
        return next((s for s in self.sessions() if s.instance_id == instance_id), None)

    def sessions(self, *, live: bool | None = None, stack: str | None = None) -> list[Entry]:
        rows = self.db.execute(
            "SELECT stack, cloud, instance_id, gpu, model, price_per_hour, started_at, ended_at, budget FROM sessions ORDER BY started_at"
        ).fetchall()
        found = [Entry(*row) for row in rows]
        if live is not None:
            found = [s for s in found if (s.ended_at is None) == live]
        return [s for s in found if stack is None or s.stack == stack]

    def by_month(self) -> dict[str, float]:
        months: dict[str, float] = {}
        for s in self.sessions():
            months[s.month] = round(months.get(s.month, 0.0) + s.cost, 4)
        return months

    def total(self) -> float:
        return round(sum(s.cost for s in self.sessions()), 4)

    def cache_deleted(self, cloud: str, region: str, volume_id: str, created_at: str, cost: float | None) -> None:
        """Keep what a deleted cache volume cost while it was kept (USD, an estimate: CacheInfo.so_far_usd;
        None when unknown), so `cost` still counts it."""
        with self.db:
            self.db.execute(
                "INSERT INTO deleted_caches (cloud, region, volume_id, created_at, deleted_at, cost) VALUES (?, ?, ?, ?, ?, ?)",
                (cloud, region, volume_id, created_at, time.time(), cost),
            )

    def deleted_caches(self) -> list[dict]:
        """Each deleted cache: cloud, region, volume_id, created_at (ISO), deleted_at (ISO), cost (USD or None)."""
        rows = self.db.execute(
            "SELECT cloud, region, volume_id, created_at, deleted_at, cost FROM deleted_caches ORDER BY deleted_at"
        ).fetchall()
        keys = ("cloud", "region", "volume_id", "created_at", "deleted_at", "cost")
        return [
            dict(zip(keys, row, strict=True)) | {"deleted_at": datetime.fromtimestamp(row[4], UTC).isoformat(timespec="seconds")}
            for row in rows
        ]


def spend(stack: str) -> str:
    """One line on what the stack's session has cost so far, its rate, its lease and its budget."""
    live = Ledger().sessions(live=True, stack=stack)
    if not live:
        return f"stack {stack} has no running session in the ledger"
    s = live[-1]
    parts = [f"${s.cost:.2f} so far ({s.hours:.2f} h at ${s.price_per_hour:.2f}/h)"]
    live = record.find(stack)
    left = live.lease_left_h() if live else None
    if left is not None:
        parts.append(f"lease ends in {left:.2f} h (≈ ${max(left, 0) * s.price_per_hour:.2f} more)" if left > 0 else "lease ended")
    if s.budget:
        parts.append(f"budget ${s.budget:.2f}, ${max(s.budget - s.cost, 0):.2f} left")
    return "; ".join(parts)
