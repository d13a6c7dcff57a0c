"""An on-disk answer cache (SQLite), so a rerun or a resumed run never repeats a finished API call.

Keys are hashes of everything that decides an answer: model, image content, candidates, the rendered
prompt (in-context images included by content hash) and the generation parameters. Values are the raw
answers. Nothing secret is stored: no API key, no base URL credentials.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from PIL import Image


def image_digest(image: Image.Image) -> str:
    """SHA-256 of an image's pixels, mode and size: the same picture gives the same digest."""
    h = hashlib.sha256(f"{image.mode}|{image.size[0]}x{image.size[1]}|".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    """A stable key for a JSON-serialisable description of a call."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class AnswerCache:
    """Raw answers by key in a SQLite file; safe to share between threads of one process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        with self._lock:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS answers ("
                "key TEXT PRIMARY KEY, model TEXT NOT NULL, raw TEXT NOT NULL, created REAL NOT NULL)"
            )
            self._db.commit()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT raw FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, model: str, raw: str) -> None:
        """Store one answer and commit at once, so an interrupted run keeps it."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO answers (key, model, raw, created) VALUES (?, ?, ?, ?)",
                (key, model, raw, time.time()),
            )
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
