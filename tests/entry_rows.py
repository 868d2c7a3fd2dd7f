"""The local cache's entries as tests see them: rows of `.mlbuild/cache/entries.db`.

`rows(root)` reads every entry (its JSON) with an `EntryRow` handle that reads,
rewrites and deletes that one row, as tests did with entry files before.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any


def db_path(root: Path) -> Path:
    return root / ".mlbuild/cache/entries.db"


def _connect(root: Path) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(db_path(root), isolation_level=None, timeout=30))


class EntryRow:
    """One row of the entry database, by key (it need not exist)."""

    def __init__(self, root: Path, key: str) -> None:
        self.root = root
        self.key = key

    def read_bytes(self) -> bytes:
        with _connect(self.root) as conn:
            row = conn.execute("SELECT data FROM entries WHERE key = ?", (self.key,)).fetchone()
        if row is None:
            raise FileNotFoundError(self.key)
        return bytes(row[0])

    def write_bytes(self, data: bytes) -> None:
        """Replace (or add) the row's payload, its other columns kept (or made up)."""
        with _connect(self.root) as conn:
            conn.execute(
                "INSERT INTO entries (key, target, created, size, data) VALUES (?, '', 0, 0, ?)"
                " ON CONFLICT (key) DO UPDATE SET data = excluded.data",
                (self.key, data),
            )

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def exists(self) -> bool:
        with _connect(self.root) as conn:
            found = conn.execute("SELECT 1 FROM entries WHERE key = ?", (self.key,)).fetchone()
        return found is not None

    def unlink(self) -> None:
        with _connect(self.root) as conn:
            conn.execute("DELETE FROM entries WHERE key = ?", (self.key,))


def rows(root: Path) -> list[tuple[EntryRow, dict[str, Any]]]:
    """Every row of the project's entry database, by key, with its JSON."""
    if not db_path(root).exists():
        return []
    with _connect(root) as conn:
        found = conn.execute("SELECT key, data FROM entries ORDER BY key").fetchall()
    return [(EntryRow(root, key), json.loads(data)) for key, data in found]
