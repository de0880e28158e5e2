"""The control plane's state in SQLite (stdlib sqlite3): survives restarts, one writer at a time.

Resources are stored as the API documents DRS returns (JSON), plus an `internal` JSON per recovery
instance for what the service knows but does not show (linked client, mapping, launch request...).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS source_servers (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS recovery_instances (id TEXT PRIMARY KEY, doc TEXT NOT NULL, internal TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS client_logs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, failback_client_id TEXT, recovery_instance_id TEXT,
  timestamp TEXT NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS client_metrics (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, failback_client_id TEXT, recovery_instance_id TEXT,
  name TEXT NOT NULL, value REAL NOT NULL, unit TEXT, timestamp TEXT);
"""


@dataclass
class RecoveryInstanceRecord:
    doc: dict[str, Any]
    internal: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.doc["recoveryInstanceID"]


class Store:
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        # One connection shared by the server threads, serialized by a lock: simple and enough here.
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._depth = 0

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[Store]:
        """All reads and writes of one request happen in one transaction (nested calls join it)."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")
            finally:
                self._depth = 0

    # key/value
    def get(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, value: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))

    # source servers
    def source_servers(self) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in self._conn.execute("SELECT doc FROM source_servers ORDER BY id")]

    def source_server(self, server_id: str) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT doc FROM source_servers WHERE id = ?", (server_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def save_source_server(self, doc: dict[str, Any]) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO source_servers (id, doc) VALUES (?, ?)", (doc["sourceServerID"], json.dumps(doc))
        )

    # recovery instances
    def recovery_instances(self) -> list[RecoveryInstanceRecord]:
        rows = self._conn.execute("SELECT doc, internal FROM recovery_instances ORDER BY id")
        return [RecoveryInstanceRecord(json.loads(d), json.loads(i)) for d, i in rows]

    def recovery_instance(self, instance_id: str) -> RecoveryInstanceRecord | None:
        row = self._conn.execute("SELECT doc, internal FROM recovery_instances WHERE id = ?", (instance_id,)).fetchone()
        return RecoveryInstanceRecord(json.loads(row[0]), json.loads(row[1])) if row else None

    def save_recovery_instance(self, record: RecoveryInstanceRecord) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO recovery_instances (id, doc, internal) VALUES (?, ?, ?)",
            (record.id, json.dumps(record.doc), json.dumps(record.internal)),
        )

    # jobs
    def job(self, job_id: str) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def jobs(self) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in self._conn.execute("SELECT doc FROM jobs ORDER BY id")]

    def save_job(self, doc: dict[str, Any]) -> None:
        self._conn.execute("INSERT OR REPLACE INTO jobs (id, doc) VALUES (?, ?)", (doc["jobID"], json.dumps(doc)))

    # what the failback client uploads
    def add_logs(self, client_id: str | None, instance_id: str | None, events: list[dict[str, Any]]) -> None:
        self._conn.executemany(
            "INSERT INTO client_logs (failback_client_id, recovery_instance_id, timestamp, level, message) "
            "VALUES (?, ?, ?, ?, ?)",
            [(client_id, instance_id, e["timestamp"], e["level"], e["message"]) for e in events],
        )

    def logs(self) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT failback_client_id, recovery_instance_id, timestamp, level, message FROM client_logs ORDER BY seq"
        )
        keys = ("failbackClientID", "recoveryInstanceID", "timestamp", "level", "message")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def add_metrics(self, client_id: str | None, instance_id: str | None, metrics: list[dict[str, Any]]) -> None:
        self._conn.executemany(
            "INSERT INTO client_metrics (failback_client_id, recovery_instance_id, name, value, unit, timestamp) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(client_id, instance_id, m["name"], m["value"], m.get("unit"), m.get("timestamp")) for m in metrics],
        )

    def metrics(self) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT failback_client_id, recovery_instance_id, name, value, unit, timestamp "
            "FROM client_metrics ORDER BY seq"
        )
        keys = ("failbackClientID", "recoveryInstanceID", "name", "value", "unit", "timestamp")
        return [dict(zip(keys, r, strict=True)) for r in rows]
