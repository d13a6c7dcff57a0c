"""The answer store: one content-addressed SQLite file of LVLM answers, so no answer is paid for twice.

Every backend's answers go through it (the LVLM stage looks each request up before asking the backend;
the API backend also keeps its raw responses here as they arrive). Keys are SHA-256 hashes of
everything that decides an answer: the model's identity (weights content hash for local files, provider
+ model name for APIs), every answer setting (the backend's ``answer_fingerprint``), the image content,
the candidates in order, the in-context examples and the request key (it seeds the shuffled-options
ablation). A stored answer from another model, prompt or candidate list therefore never serves a request.

Durability: each write is one SQLite transaction in WAL mode, so a process killed with ``kill -9``
loses at most the transaction in flight (never the file); several processes (DDP ranks, parallel runs)
may read and write one file at once (a busy writer is waited for). Each value carries a checksum; an
entry that does not match it, or that does not decode, is deleted and asked again, never trusted.
Nothing secret is stored. Size and eviction: see docs/lvlm.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from cascadevlm.lvlm.base import _plain

# Waiting for another process's write (a DDP rank, a parallel run) before giving up, in seconds.
BUSY_TIMEOUT_S = 60.0


def image_digest(image: Image.Image) -> str:
    """SHA-256 of an image's pixels, mode and size: the same picture gives the same digest."""
    h = hashlib.sha256(f"{image.mode}|{image.size[0]}x{image.size[1]}|".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    """A stable key for a JSON-serialisable description of a call."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _checksum(key: str, value: str) -> str:
    return hashlib.sha256(f"{key}\0{value}".encode()).hexdigest()[:16]


@dataclass
class StoredAnswer:
    """An answer as the store keeps it: the chosen candidate position, raw text, scores, fallback, and
    what it cost when first computed (wall seconds per image, API tokens; None: unknown, as in entries
    stored before costs were kept, which still read)."""

    choice: int
    raw: str
    scores: list[float] | None = None
    fallback: str | None = None
    seconds: float | None = field(default=None, compare=False)  # a cost, not part of the answer
    prompt_tokens: int | None = field(default=None, compare=False)
    completion_tokens: int | None = field(default=None, compare=False)


def _columns(conn: sqlite3.Connection) -> set[str]:
    """The answers table's column names."""
    return {row[1] for row in conn.execute("PRAGMA table_info(answers)")}


def _is_busy(err: sqlite3.OperationalError) -> bool:
    """Another connection holds the lock (worth waiting for), as opposed to a damaged or foreign file."""
    text = str(err).lower()
    return "locked" in text or "busy" in text


class AnswerStore:
    """Values by key in one SQLite file: thread-safe in a process, shared between processes, picklable
    (each process opens its own connection on first use). ``corrupt`` counts entries found damaged."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.corrupt = 0
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "corrupt": self.corrupt}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # a forked worker opens its own
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Several processes (DDP ranks, a study, workers) open one file at once. Switching a new file
            # to WAL needs an exclusive lock, and SQLite answers "database is locked" there without
            # waiting on its busy timeout, so a locked open is tried again until the timeout has passed.
            deadline, wait = time.monotonic() + BUSY_TIMEOUT_S, 0.02
            while True:
                try:
                    conn = self._connect()
                    break
                except sqlite3.OperationalError as err:
                    if not _is_busy(err) or time.monotonic() >= deadline:
                        raise self._cannot_open(err) from None
                    time.sleep(wait)
                    wait = min(wait * 2, 1.0)
                except sqlite3.DatabaseError as err:
                    raise self._cannot_open(err) from None
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _connect(self) -> sqlite3.Connection:
        """One connection, in WAL mode, with the answers table; closed again if any step fails."""
        conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; kill -9 safe
            conn.execute("PRAGMA synchronous=NORMAL")  # durable against a killed process (not power loss)
            conn.execute(
                "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
                "raw TEXT NOT NULL, created REAL NOT NULL, checksum TEXT)"
            )
            if "checksum" not in _columns(conn):  # files written before checksums: their rows stay readable
                try:
                    conn.execute("ALTER TABLE answers ADD COLUMN checksum TEXT")
                except sqlite3.OperationalError as err:
                    # Another process (a DataLoader worker, a DDP rank) added it between our look and
                    # our ALTER: the file is as we want it.
                    if "duplicate column" not in str(err).lower():
                        raise
            conn.commit()
        except BaseException:
            conn.close()
            raise
        return conn

    def _cannot_open(self, err: Exception) -> ValueError:
        return ValueError(
            f"the LVLM answer store {self.path} cannot be opened ({err}): delete that file (its "
            "answers are asked again) or point --answer_store elsewhere"
        )

    def get(self, key: str) -> str | None:
        """The value stored under ``key``; None when absent or damaged (a damaged entry is deleted)."""
        with self._lock:
            row = self._db.execute("SELECT raw, checksum FROM answers WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            raw, checksum = row
            if checksum is not None and checksum != _checksum(key, raw):
                self._forget(key, raw, checksum)
                return None
        return raw

    def _forget(self, key: str, raw: str, checksum: str | None = None) -> None:
        """Drop the damaged entry seen (lock held) so it is asked again and stored afresh. Only that very
        value goes (and, given, its checksum): another process may have stored a good answer under the key
        since it was read, and that one is kept."""
        self.corrupt += 1
        if checksum is None:
            self._db.execute("DELETE FROM answers WHERE key = ? AND raw = ?", (key, raw))
        else:
            self._db.execute(
                "DELETE FROM answers WHERE key = ? AND raw = ? AND checksum = ?", (key, raw, checksum)
            )
        self._db.commit()

    def put(self, key: str, model: str, raw: str) -> None:
        """Store one value and commit at once, so an interrupted run keeps it."""
        self.put_many([(key, model, raw)])

    def put_many(self, items: list[tuple[str, str, str]]) -> None:
        """Store ``(key, model, value)`` items in one transaction: all of them or, if killed, none."""
        if not items:
            return
        now = time.time()
        rows = [(key, model, raw, now, _checksum(key, raw)) for key, model, raw in items]
        with self._lock:
            with self._db:  # one transaction, committed on leaving
                self._db.executemany(
                    "INSERT OR REPLACE INTO answers (key, model, raw, created, checksum) VALUES (?, ?, ?, ?, ?)",
                    rows,
                )

    # --------------------------------------------------------------------------- answers of the stage
    def get_answer(self, key: str, num_candidates: int) -> StoredAnswer | None:
        """A stored answer for a request with ``num_candidates`` candidates; None when there is none or
        it does not decode into one (then it is dropped and the request asked again)."""
        raw = self.get(key)
        if raw is None:
            return None
        try:
            a = StoredAnswer(**json.loads(raw))
            ok = isinstance(a.choice, int) and 0 <= a.choice < num_candidates and isinstance(a.raw, str)
            ok = ok and (a.scores is None or len(a.scores) == num_candidates)
            ok = ok and (a.seconds is None or isinstance(a.seconds, (int, float)))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            with self._lock:
                self._forget(key, raw)
            return None
        return a

    def put_answers(self, model: str, answers: dict[str, StoredAnswer]) -> None:
        """Store the answers of one batch (key -> answer) in one transaction."""
        self.put_many([(key, model, json.dumps(a.__dict__, allow_nan=True)) for key, a in answers.items()])

    # --------------------------------------------------------------------------- weights identity
    def file_digest(self, path: str | Path) -> str:
        """SHA-256 of a file's content, remembered in the store by (path, size, mtime) so a rerun does
        not read multi-gigabyte weights again."""
        p = Path(path).resolve()
        st = p.stat()
        memo = f"file-digest|{p}|{st.st_size}|{st.st_mtime_ns}"
        known = self.get(memo)
        if known is not None:
            return known
        h = hashlib.sha256()
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        self.put(memo, "file-digest", h.hexdigest())
        return h.hexdigest()

    def path_digest(self, path: str | Path) -> str:
        """Content hash of a file, or of every file under a directory (names and contents; hidden
        files left out): the identity of local weights (a model directory, a LoRA adapter)."""
        root = Path(path)
        if root.is_file():
            return self.file_digest(root)
        h = hashlib.sha256()
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = f.relative_to(root)
            if any(part.startswith(".") for part in rel.parts):
                continue
            h.update(f"{rel.as_posix()}\0{self.file_digest(f)}\n".encode())
        return h.hexdigest()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


# The API backend's name for the same store (its raw responses, as they arrive).
AnswerCache = AnswerStore


def model_identity(backend, store: AnswerStore) -> dict:
    """What identifies a backend's answers: its answer settings (``answer_fingerprint``: model, prompt,
    mode, ...), the content hash of every local file or directory those settings name (weights, LoRA
    adapters: the same path with other weights is another model), and for API backends the provider
    (the endpoint, credentials left out) beside the model name."""
    fp = backend.answer_fingerprint()
    weights = {}
    for name, value in sorted(fp.items()):
        if isinstance(value, str) and value and os.path.exists(value):
            weights[name] = store.path_digest(value)
    provider = getattr(backend, "url", None)
    # The prompt as it will be written: evaluate.py sets a default prompt's noun from the dataset after
    # the backend is built, which the init arguments in ``fp`` do not show.
    prompt = getattr(backend, "prompt", None)
    return {
        "answers": fp,
        "weights": weights,
        **({"prompt": _plain(prompt)} if prompt is not None else {}),
        **({"provider": provider} if isinstance(provider, str) else {}),
    }


def answer_key(model_key: str, request) -> str:
    """The store key of one request (an :class:`~cascadevlm.lvlm.base.LVLMRequest`) for the model whose
    identity hashes to ``model_key``: image content, candidates in order, fallback position, in-context
    examples (image content and class) and the request key."""
    return cache_key(
        {
            "model": model_key,
            "image": image_digest(request.image),
            "candidates": list(request.candidates),
            "fallback": request.fallback,
            "examples": [[image_digest(e.image), e.class_name] for e in request.examples],
            "key": request.key,
        }
    )
