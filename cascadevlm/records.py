"""Prediction records: one row per image, the single source every metric, sweep, report and plot reads.

Records are written as JSON lines while a run progresses (one part file per rank, appended batch by
batch, so an interrupted run loses nothing finished) and merged into one Parquet table at the end,
de-duplicated by image index (a distributed sampler pads shards with repeats).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


@dataclass
class PredictionRecord:
    """What happened to one image in the cascade. Class ids index the dataset's class list."""

    index: int  # row of the image in its split
    label: int  # true class id (-1 when unknown)
    clip_topk: list[int]  # CLIP's top-k class ids, most probable first
    clip_topk_probs: list[float]  # their probabilities
    entropy: float  # entropy (nats) of CLIP's full distribution
    clip_pred: int  # CLIP's top-1 class id
    deferred: bool = False  # sent to the LVLM by the gate
    lvlm_choice: int | None = None  # class id the LVLM chose (after any fallback)
    lvlm_raw: str | None = None  # the LVLM's raw answer text
    lvlm_scores: list[float] | None = None  # per-candidate scores, where the backend has them
    final: int = -1  # the cascade's prediction
    fallback: str | None = None  # e.g. "unparseable": the LVLM's answer was replaced by CLIP's top-1
    clip_zero_shot_pred: int | None = None  # zero-shot CLIP's top-1 when an adapter made clip_pred
    clip_logits: list[float] | None = None  # CLIP's logits over all classes (calibration, conformal sets)

    def __post_init__(self) -> None:
        if self.final == -1:
            self.final = self.clip_pred


RECORD_FIELDS = [f.name for f in fields(PredictionRecord)]

ARROW_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("label", pa.int64()),
        ("clip_topk", pa.list_(pa.int64())),
        ("clip_topk_probs", pa.list_(pa.float64())),
        ("entropy", pa.float64()),
        ("clip_pred", pa.int64()),
        ("deferred", pa.bool_()),
        ("lvlm_choice", pa.int64()),
        ("lvlm_raw", pa.string()),
        ("lvlm_scores", pa.list_(pa.float64())),
        ("final", pa.int64()),
        ("fallback", pa.string()),
        ("clip_zero_shot_pred", pa.int64()),
        ("clip_logits", pa.list_(pa.float32())),  # float32 logits: no loss; tables without it read as None
    ]
)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renamed onto ``path`` only when the block succeeds, so a
    reader (or a resumed run) never sees a half-written output.

    The temporary name is this writer's own: several processes may write one output at once (DDP ranks,
    DataLoader workers, two runs sharing a cache), also from other machines on a shared file system,
    where process ids repeat (each container's first process is pid 1).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def claimed(path: str | Path, on_busy: Callable[[object], None]) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if need be) for the block. When another process holds
    it, ``on_busy(file)`` decides: raise (refuse) or ``fcntl.flock(file, fcntl.LOCK_EX)`` (wait). The
    claim ends with the block or with the process (kill -9 included), so a killed run never locks out its
    rerun. Local file systems only: flock across machines depends on the network file system."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_busy(fh)
        yield  # closing the file releases the claim


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def repair_torn_tail(path: str | Path) -> int:
    """Cut a last line that a killed writer left without its newline; returns the bytes removed.

    Appending after such a fragment would glue the next row onto it and make the file unreadable.
    """
    path = Path(path)
    if not path.exists():
        return 0
    with path.open("rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        # find the last newline (read backwards in blocks)
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - 65536)
            fh.seek(start)
            block = fh.read(end - start)
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            end = start
        fh.truncate(keep)
        return size - keep


def append_json_lines(path: str | Path, rows: Iterable) -> None:
    """Append dataclass rows (plain-valued fields) to a JSON-lines file and flush, so a crash after this
    call loses none of them. A torn last line from a killed run is cut first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_torn_tail(path)
    with path.open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(vars(row)) + "\n")  # fields are plain values: no deep copy needed
        fh.flush()


def read_json_lines(path: str | Path, row_type: type, what: str = "record") -> list:
    """Rows of ``row_type`` from a JSON-lines file; a last line cut short by a crash is ignored."""
    out = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(row_type(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            if i == len(lines) - 1:  # torn write at the end of an interrupted run
                break
            raise ValueError(f"{path}: line {i + 1} is not a JSON {what}") from None
    return out


def append_jsonl(path: str | Path, records: Iterable[PredictionRecord]) -> None:
    """Append prediction records to a JSON-lines file (see :func:`append_json_lines`)."""
    append_json_lines(path, records)


def read_jsonl(path: str | Path) -> list[PredictionRecord]:
    """Prediction records from JSON lines; a last line cut short by a crash is ignored."""
    return read_json_lines(path, PredictionRecord)


def dedupe_sorted(records: Iterable[PredictionRecord]) -> list[PredictionRecord]:
    """One record per image index (the first seen wins), sorted by index."""
    seen: dict[int, PredictionRecord] = {}
    for rec in records:
        seen.setdefault(rec.index, rec)
    return [seen[i] for i in sorted(seen)]


def write_records(path: str | Path, records: list[PredictionRecord]) -> Path:
    """Write records as Parquet (``.parquet``) or JSON lines (any other suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a crash never leaves a half-written table
        if path.suffix == ".parquet":
            table = pa.Table.from_pylist([asdict(r) for r in records], schema=ARROW_SCHEMA)
            pq.write_table(table, tmp)
        else:
            append_jsonl(tmp, records)
    return path


def read_records(path: str | Path) -> list[PredictionRecord]:
    """Read a records table written by :func:`write_records`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"records file {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        return [PredictionRecord(**row) for row in pq.read_table(path).to_pylist()]
    return read_jsonl(path)
