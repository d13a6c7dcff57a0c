"""Running an LVLM backend over the deferred images with a Lightning Trainer (1..N devices), resumably.

Answers are appended to ``<parts_dir>/lvlm.rank<r>.jsonl`` batch by batch, and the calls each batch
made to ``lvlm.calls.rank<r>.jsonl``. A rerun of the same run reads every part file first and sends
only the images without a usable answer (an answer that is a failed API call is asked again), so an
interrupted run loses nothing finished and no answered image reaches the LVLM twice.

Across runs, the answer store (:class:`~cascadevlm.lvlm.cache.AnswerStore`, ``<cache_dir>/answers.sqlite``
by default) is looked up before the backend is asked: a rerun with another budget, tau, gate,
calibration, conformal rule or fusion (a new run directory) asks nothing that was answered before.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from cascadevlm.cascade.runner import predict_with_writer
from cascadevlm.data.loading import IMAGE_COLUMN, decode_image
from cascadevlm.lvlm.base import LVLMBackend, LVLMRequest, needs_retry
from cascadevlm.lvlm.cache import AnswerStore, StoredAnswer, answer_key, cache_key, model_identity
from cascadevlm.records import PredictionRecord, append_json_lines, atomic_write_text, read_json_lines


@dataclass
class LVLMResult:
    index: int
    candidate_ids: list[int]
    lvlm_choice: int  # class id
    raw: str
    scores: list[float] | None
    fallback: str | None
    # what the answer cost (see docs/stages.md): wall seconds per image of the batch that computed it
    # (a stored answer: the seconds stored when it was first computed; None: unknown) and API tokens.
    # Part files written before these fields read with None. Not compared: two runs that gave the same
    # answers are equal whatever they cost.
    seconds: float | None = field(default=None, compare=False)
    prompt_tokens: int | None = field(default=None, compare=False)
    completion_tokens: int | None = field(default=None, compare=False)


@dataclass
class CallCount:
    """Requests one batch sent to the model or API (cache hits excluded)."""

    calls: int


class DeferredImages(torch.utils.data.Dataset):
    """The deferred rows of a split, each with its candidate class ids (CLIP's top-k, in order, or
    ``candidates[index]`` when given: e.g. a previous LVLM stage's top-k by its scores)."""

    def __init__(
        self,
        dataset,
        records: list[PredictionRecord],
        topk: int,
        split: str,
        candidates: dict[int, list[int]] | None = None,
    ) -> None:
        self.dataset = dataset
        self.records = records
        self.topk = topk
        self.split = split
        self.candidates = candidates

    def candidate_ids(self, rec: PredictionRecord) -> list[int]:
        if self.candidates is not None:
            return list(self.candidates[rec.index])
        return rec.clip_topk[: self.topk]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        image = decode_image(self.dataset[rec.index][IMAGE_COLUMN], f"{self.split} row {rec.index}")
        key = f"{self.split}/{rec.index}"  # seeds per-image choices such as the shuffle ablation's order
        return {"index": rec.index, "image": image, "candidate_ids": self.candidate_ids(rec), "key": key}


def build_requests(batch: list[dict], class_names: list[str], exemplars=None) -> list[LVLMRequest]:
    """The backend requests of a batch of deferred images (in-context examples attached if any)."""
    requests = [
        LVLMRequest(
            image=b["image"],
            candidates=[class_names[c] for c in b["candidate_ids"]],
            fallback=0,
            key=b["key"],
        )
        for b in batch
    ]
    if exemplars is not None:
        exemplars.attach(requests, [b["index"] for b in batch])  # the query's own row is never its example
    return requests


@dataclass
class PreparedRequests:
    """Requests a backend's ``prepare`` turned into model inputs, one item per forward."""

    batches: list

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches)


@dataclass
class StoreLookup:
    """The answer store as the stage's ``collate_fn`` uses it: the store and the model's identity hash."""

    store: AnswerStore
    model_key: str


class StageCollate:
    """The LVLM stage's ``collate_fn``: a batch of deferred images -> ``(rows, work)``.

    ``rows`` keep what the answers need (index, candidate ids, key; not the image) and ``work`` is what
    the backend's ``choose`` takes: the requests, or, with ``prepare`` (a backend's picklable
    preprocessing, e.g. :attr:`TransformersBackend.prepare`), the requests already prepared in
    forward-sized batches. With ``lookup`` (the answer store), each row gets its ``store_key`` and, when
    the store holds its answer, ``stored``; only the other requests are in ``work`` (and prepared).
    In DataLoader workers this runs for the next batches while the model answers the current one.
    Holds no model, so it pickles cheaply to spawned workers.
    """

    def __init__(
        self, class_names: list[str], exemplars=None, prepare=None, lookup: StoreLookup | None = None
    ) -> None:
        self.class_names = list(class_names)
        self.exemplars = exemplars
        self.prepare = prepare
        self.lookup = lookup

    def __call__(self, batch: list[dict]) -> tuple[list[dict], object]:
        requests = build_requests(batch, self.class_names, self.exemplars)
        rows = [{k: v for k, v in b.items() if k != "image"} for b in batch]
        if self.lookup is not None:
            asked = []
            for row, req in zip(rows, requests, strict=True):
                row["store_key"] = answer_key(self.lookup.model_key, req)
                stored = self.lookup.store.get_answer(row["store_key"], len(req.candidates))
                if stored is None:
                    asked.append(req)
                else:
                    row["stored"] = stored
            requests = asked
        if self.prepare is None or not requests:
            return rows, requests
        split = getattr(self.prepare, "split", None)  # forward-sized batches, as choose() would
        return rows, PreparedRequests(split(requests) if split else [self.prepare(requests)])


class LVLMStage(L.LightningModule):
    """Wraps a backend so Lightning shards the deferred images over devices; no trainable parameters."""

    def __init__(
        self, backend: LVLMBackend, class_names: list[str], exemplars=None, store: AnswerStore | None = None
    ) -> None:
        super().__init__()
        self.backend = backend
        self.class_names = list(class_names)
        self.exemplars = exemplars  # an ExemplarPool, or None for zero-shot prompts
        self.store = store  # answers of earlier runs (any run directory); None: ask everything
        self.lookup = None
        if store is not None:
            self.lookup = StoreLookup(store, cache_key(model_identity(backend, store)))

    def requests(self, batch: list[dict]) -> list[LVLMRequest]:
        """The backend requests of a batch of deferred images (as :class:`DeferredImages` gives them)."""
        return build_requests(batch, self.class_names, self.exemplars)

    def collate(self, workers: int = 0) -> StageCollate:
        """The DataLoader's ``collate_fn``. With ``workers`` > 0 and a backend that has ``prepare``
        (the transformers backend), prompt rendering and image processing run in the workers, ahead
        of the model; with none, :meth:`predict_step` hands the backend plain requests, as before.
        Requests the answer store holds are answered from it and never prepared."""
        prepare = getattr(self.backend, "prepare", None) if workers > 0 else None
        return StageCollate(self.class_names, self.exemplars, prepare, self.lookup)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int = 0):
        # The backend places its inputs itself (device_map aware); Lightning's walk over the batch's
        # dataclasses would only copy requests and images.
        return batch

    def predict_step(self, batch, batch_idx: int = 0) -> list[LVLMResult]:
        """Answers for ``batch``: ``(rows, work)`` from :class:`StageCollate`, or a list of rows."""
        rows, work = batch if isinstance(batch, tuple) else self.collate()(batch)
        if work and callable(getattr(self.backend, "load", None)):
            self.backend.load()  # a lazily loaded model: its loading is no image's cost
        start = time.perf_counter()  # the fresh requests' wall time, shared equally among them
        if isinstance(work, PreparedRequests):
            fresh = [a for prepared in work.batches for a in self.backend.choose(prepared)]
        else:
            fresh = self.backend.choose(work) if work else []
        per_image = (time.perf_counter() - start) / len(fresh) if fresh else None
        asked = [b for b in rows if "stored" not in b]
        if len(fresh) != len(asked):
            raise RuntimeError(f"backend returned {len(fresh)} answers for {len(asked)} requests")
        new = iter(fresh)
        answers = [b["stored"] if "stored" in b else next(new) for b in rows]
        out = []
        for b, a in zip(rows, answers, strict=True):
            if not 0 <= a.choice < len(b["candidate_ids"]):
                raise RuntimeError(
                    f"backend chose position {a.choice} among {len(b['candidate_ids'])} candidates"
                )
            seconds = a.seconds if "stored" in b else per_image
            out.append(
                LVLMResult(
                    b["index"], b["candidate_ids"], b["candidate_ids"][a.choice], a.raw, a.scores, a.fallback,
                    None if seconds is None or not math.isfinite(seconds) else float(seconds),
                    a.prompt_tokens, a.completion_tokens,
                )
            )  # fmt: skip
        if self.lookup is not None:  # failed API calls are never stored: a rerun asks them again
            self.lookup.store.put_answers(
                self.lookup.model_key,
                {b["store_key"]: StoredAnswer(a.choice, a.raw, a.scores, a.fallback, per_image,
                                              a.prompt_tokens, a.completion_tokens)
                 for b, a in zip(asked, fresh, strict=True) if not needs_retry(a.fallback)},
            )  # fmt: skip
        return out


class LVLMAnswerWriter(BasePredictionWriter):
    """Appends each finished batch's answers to this rank's part file (never truncates: resumable; a
    torn last line is cut first), and the calls the batch made to this rank's call-count file."""

    def __init__(self, parts_dir: str | Path, backend: LVLMBackend | None = None) -> None:
        super().__init__(write_interval="batch")
        self.parts_dir = Path(parts_dir)
        self.backend = backend
        self._calls_seen = backend.calls if backend is not None else 0

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        rank = trainer.global_rank
        append_json_lines(self.parts_dir / f"lvlm.rank{rank}.jsonl", prediction)
        if self.backend is not None:
            now = self.backend.calls
            append_json_lines(
                self.parts_dir / f"lvlm.calls.rank{rank}.jsonl", [CallCount(now - self._calls_seen)]
            )
            self._calls_seen = now


def read_answers(parts_dir: str | Path) -> dict[int, LVLMResult]:
    """Every answer written so far, by image index (a torn last line of a killed run is ignored).

    A real answer wins over a failed API call (``api_error``) for the same image, whichever came first.
    """
    out: dict[int, LVLMResult] = {}
    for path in sorted(Path(parts_dir).glob("lvlm.rank*.jsonl")):
        for r in read_json_lines(path, LVLMResult, "LVLM answer"):
            old = out.get(r.index)
            if old is None or (needs_retry(old.fallback) and not needs_retry(r.fallback)):
                out[r.index] = r
    return out


def read_lvlm_calls(parts_dir: str | Path) -> int:
    """Requests sent to the LVLM by every rank of every attempt of this run so far."""
    return sum(
        c.calls
        for path in sorted(Path(parts_dir).glob("lvlm.calls.rank*.jsonl"))
        for c in read_json_lines(path, CallCount, "LVLM call count")
    )


FINGERPRINT_FILE = "lvlm.config.json"


def _digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{k}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            keys.append(f"{prefix}{k}")
    return keys


def check_stage_fingerprint(parts_dir: str | Path, config: dict) -> None:
    """Refuse to mix answers of differently configured LVLM stages in one run directory.

    A fingerprint without any stored answer (a run that crashed before its first answer) blocks nothing.
    """
    parts_dir = Path(parts_dir)
    path = parts_dir / FINGERPRINT_FILE
    if not path.exists() or not read_answers(parts_dir):
        return
    old = json.loads(path.read_text())
    new = json.loads(json.dumps(config, default=str))
    if old.get("digest") != _digest(config):
        differ = _differences(old.get("config") or {}, new)
        raise ValueError(
            f"{parts_dir} holds LVLM answers from another LVLM configuration (differs in: "
            f"{', '.join(differ) or 'unknown'}); use another --run_name or delete that directory to start over"
        )


def write_stage_fingerprint(parts_dir: str | Path, config: dict) -> None:
    """Record (atomically) what the answers in ``parts_dir`` were given, before the first is written."""
    atomic_write_text(
        Path(parts_dir) / FINGERPRINT_FILE,
        json.dumps({"digest": _digest(config), "config": config}, indent=1, default=str),
    )


def open_answer_store(setting: str | None, cache_dir: str | Path) -> AnswerStore | None:
    """The answer store of ``--answer_store``: ``auto`` is ``<cache_dir>/answers.sqlite``, another value
    a path of its own, ``null`` (or ``none``/``off``) asks the LVLM about every image of the run."""
    if setting is None or str(setting).lower() in ("none", "null", "off", "false", ""):
        return None
    return AnswerStore(Path(cache_dir) / "answers.sqlite" if setting == "auto" else setting)


def run_lvlm_stage(
    trainer: L.Trainer,
    stage: LVLMStage,
    dataset,
    todo: list[PredictionRecord],
    topk: int,
    split: str,
    parts_dir: str | Path,
    batch_size: int,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    candidates: dict[int, list[int]] | None = None,
) -> None:
    """Ask the LVLM about ``todo`` (records still without an answer); answers land in part files.

    ``num_workers`` DataLoader workers decode the images and build the requests, and for a backend with
    ``prepare`` (the transformers backend) render the prompts and run the processor, up to
    ``prefetch_factor`` batches each ahead of the model. The workers live for the whole stage (one pass
    over one DataLoader). Neither changes an answer, so neither is in the run name or fingerprint.
    ``candidates``: each image's candidate class ids when they are not CLIP's top-``topk`` (a later
    stage of ``cascade.stages`` narrowed by the previous stage's scores).
    """
    if not todo:
        return
    backend = stage.backend
    # A backend with a request pool (the API backend) gets large batches and keeps its pool full
    # within each; answers are still appended batch by batch.
    batch_size = max(batch_size, getattr(backend, "stage_batch_size", 0) or 0)
    from cascadevlm.data.streaming import StreamedRows, is_stream

    images = DeferredImages(dataset, todo, topk, split, candidates)
    if is_stream(dataset):  # data.streaming: no random access, the rows are read in order
        extra = {
            r.index: {"candidate_ids": images.candidate_ids(r), "key": f"{split}/{r.index}"} for r in todo
        }
        images = StreamedRows(dataset, extra, split)
    loader = torch.utils.data.DataLoader(
        images,
        batch_size=batch_size,
        collate_fn=stage.collate(num_workers),
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
    if hasattr(backend, "begin_stage"):  # progress display over the whole stage (this rank's share)
        backend.begin_stage(-(-len(todo) // trainer.world_size), trainer.global_rank)
    try:
        predict_with_writer(trainer, stage, loader, LVLMAnswerWriter(parts_dir, backend))
    finally:
        if hasattr(backend, "end_stage"):
            backend.end_stage()
