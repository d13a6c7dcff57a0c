"""Several LVLM stages after CLIP (``cascade.stages``), and what every stage costs.

Stage 0 is CLIP, stages 1..S-1 the LVLMs in order. Each stage gives, for each image it was asked about,
its answer (``pred``), an ``uncertainty`` (CLIP: the run's gate score, entropy by default; an LVLM:
from p = softmax(its candidate scores): ``margin`` 1 - (p1 - p2), ``max_prob`` 1 - p1, ``entropy``
H(p); ``learned`` 1 - P(its answer is right), a logistic regression fitted on the budget split,
:mod:`cascadevlm.gating.stage_gate`) and its cost (wall seconds, API tokens, dollars from the stage's
price table). An image reaches stage s+1 iff it reached stage s and ``uncertainty_s > t_s``; its answer
is the last reached stage's, its cost the sum over every stage it reached. ``<run_dir>/stages.parquet`` holds one row per (image,
stage) (schema :data:`cascadevlm.gating.cost.STAGES_SCHEMA`, that module's interface). See docs/stages.md.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cascadevlm.gating.cost import STAGES_SCHEMA
from cascadevlm.gating.routing import gate_score
from cascadevlm.lvlm.base import LVLMBackend
from cascadevlm.records import PredictionRecord, atomic_path

# Where short backend class names (``TransformersBackend``) are looked up, as ``--lvlm`` does.
BACKEND_MODULES = ("cascadevlm.lvlm.transformers_backend", "cascadevlm.lvlm.api_backend")

PRICE_KEYS = ("usd_per_image", "usd_per_1m_prompt_tokens", "usd_per_1m_completion_tokens", "usd_per_hour")
STAGE_KEYS = ("name", "lvlm", "gate", "tau", "candidates", "topk", "price")
FORMULA_GATES = ("margin", "max_prob", "entropy")  # a formula of the stage's candidate scores
GATES = (*FORMULA_GATES, "learned")  # learned: fitted on the budget split (cascadevlm.gating.stage_gate)
CANDIDATE_SOURCES = ("clip", "previous")
COST_UNITS = ("seconds", "usd")


# ------------------------------------------------------------------------------------------- prices
def check_price(price, where: str) -> dict | None:
    """A price table as given (``None``: unknown); refuses, in one line, a key or value it cannot use."""
    if price is None:
        return None
    if not isinstance(price, dict):
        raise ValueError(f"{where} must be a mapping of {', '.join(PRICE_KEYS)}, got {price!r}")
    if not price:
        raise ValueError(
            f"{where} is empty: give at least one of {', '.join(PRICE_KEYS)} (or leave it unset: unknown)"
        )
    for key, value in price.items():
        if key not in PRICE_KEYS:
            raise ValueError(f"{where} has an unknown key {key!r}; known: {', '.join(PRICE_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"{where}.{key} must be a finite number >= 0, got {value!r}")
    return {k: float(v) for k, v in price.items()}


def usd_of(
    price: dict | None, seconds: float | None, prompt_tokens: int | None, completion_tokens: int | None
) -> float | None:
    """Dollars of one image at one stage: usd_per_image + tokens x their rates + seconds/3600 x
    usd_per_hour. None (unknown, never 0) without a price, or when a rate it sets has no quantity to
    apply to (e.g. a token rate on a backend that reports no tokens, an hourly rate without seconds)."""
    if not price:
        return None
    total = price.get("usd_per_image", 0.0)
    for key, quantity, scale in (
        ("usd_per_1m_prompt_tokens", prompt_tokens, 1e-6),
        ("usd_per_1m_completion_tokens", completion_tokens, 1e-6),
        ("usd_per_hour", seconds, 1 / 3600),
    ):
        if key not in price:
            continue
        if quantity is None or not math.isfinite(quantity):
            return None
        total += price[key] * quantity * scale
    return float(total)


# ------------------------------------------------------------------------------------------- gates
def softmax(scores: Sequence[float]) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0 or not np.isfinite(s).any():
        return np.full(s.shape, np.nan)
    e = np.exp(s - s[np.isfinite(s)].max())
    return e / e.sum()


def lvlm_uncertainty(scores: Sequence[float] | None, gate: str) -> float:
    """An LVLM stage's uncertainty (higher = less sure) from its candidate scores; NaN without scores.
    The formulas are CLIP's gate scores (``gating.routing.gate_score``) on ``log softmax(scores)``."""
    if not scores:
        return math.nan
    p = softmax(scores)
    if np.isnan(p).any():
        return math.nan
    if gate not in FORMULA_GATES:
        raise ValueError(
            f"unknown LVLM gate {gate!r}; known: {', '.join(FORMULA_GATES)} (a learned gate is fitted: "
            "cascadevlm.gating.stage_gate)"
        )
    with np.errstate(divide="ignore"):  # a candidate with probability 0 has log-probability -inf
        logp = np.log(p)[None, :]
    return float(gate_score(gate, logp)[0])


def clip_uncertainty(rec: PredictionRecord, gate: str = "entropy") -> float:
    """CLIP's uncertainty: its entropy, or 1 - p1 (``max_prob``) / 1 - (p1 - p2) (``margin``) of its
    top-k probabilities; other gates (learned, calibrated) are reported by the entropy."""
    p = rec.clip_topk_probs
    if gate == "max_prob" and p:
        return float(1.0 - p[0])
    if gate == "margin" and p:
        return float(1.0 - (p[0] - (p[1] if len(p) > 1 else 0.0)))
    return float(rec.entropy)


def ranked_candidates(candidate_ids: Sequence[int], scores: Sequence[float] | None, topk: int) -> list[int]:
    """The ``topk`` candidates of an answer by its scores, best first (ties: the earlier candidate)."""
    if scores is None:
        raise ValueError("an answer without scores cannot rank candidates")
    order = sorted(range(len(candidate_ids)), key=lambda c: (-scores[c], c))
    return [int(candidate_ids[c]) for c in order[:topk]]


# ------------------------------------------------------------------------------------------- stages
@dataclass
class StageSpec:
    """One LVLM stage of ``cascade.stages``, checked and with its backend built."""

    index: int  # 1..S-1
    name: str
    backend: LVLMBackend
    spec: dict  # the backend's config as loaded ({class_path, init_args})
    gate: str = "margin"
    tau: float | None = None
    candidates: str = "clip"
    topk: int = 5
    price: dict | None = None
    where: str = ""

    def identity(self) -> dict:
        """What changes this stage's answers or its place in the cascade (run name, metrics.json)."""
        return {
            "name": self.name,
            "lvlm": self.backend.answer_fingerprint(),
            "gate": self.gate,
            "tau": self.tau,
            "candidates": self.candidates,
            "topk": self.topk,
            "price": self.price,
        }


def _resolve_file(value: str, config_dirs: Sequence[Path]) -> Path | None:
    for base in [*config_dirs, Path.cwd()]:
        p = (base / value) if not Path(value).is_absolute() else Path(value)
        if p.is_file():
            return p
    return None


def _backend_class(class_path: str, where: str) -> type:
    candidates = [class_path] if "." in class_path else [f"{m}.{class_path}" for m in BACKEND_MODULES]
    for full in candidates:
        module, _, name = full.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            continue
        if isinstance(cls, type) and issubclass(cls, LVLMBackend):
            return cls
    known = ", ".join(["TransformersBackend", "OpenAIBackend"])
    raise ValueError(
        f"{where}.lvlm: unknown LVLM backend class {class_path!r}; known: {known} (or a full "
        "module.Class path of an LVLMBackend subclass)"
    )


def build_backend(spec, where: str, config_dirs: Sequence[Path] = ()) -> tuple[LVLMBackend, dict]:
    """A stage's backend from its ``lvlm`` entry: a config file path (relative to the config file or the
    working directory) or an inline ``{class_path, init_args}``; returns it and the spec as loaded."""
    import yaml
    from jsonargparse import ArgumentParser

    if isinstance(spec, (str, Path)):
        path = _resolve_file(str(spec), config_dirs)
        if path is None:
            looked = ", ".join(str(d) for d in [*config_dirs, Path.cwd()])
            raise ValueError(
                f"{where}.lvlm: config file {str(spec)!r} not found (looked in {looked}); give a path "
                "relative to the config file or the working directory, or an inline {class_path, init_args}"
            )
        spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not spec.get("class_path"):
        raise ValueError(
            f"{where}.lvlm must be a config file path or a mapping with class_path (and init_args), got {spec!r}"
        )
    cls = _backend_class(str(spec["class_path"]), where)
    spec = {
        "class_path": f"{cls.__module__}.{cls.__qualname__}",
        "init_args": dict(spec.get("init_args") or {}),
    }
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LVLMBackend, "lvlm", required=True)
    try:
        backend = parser.instantiate_classes(parser.parse_object({"lvlm": copy.deepcopy(spec)})).lvlm
    except Exception as err:  # jsonargparse's errors span lines; the backend's own are one line
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ValueError(f"{where}.lvlm ({cls.__name__}): {first}") from None
    return backend, spec


def parse_stages(
    raw,
    config_dirs: Sequence[Path],
    default_topk: int,
    num_classes: int,
    cost_budget: float | None,
    lvlm_on_val: bool = False,
    budget_split: str = "val",
) -> list[StageSpec]:
    """``cascade.stages`` checked and built, in order; each problem refused in one line. ``lvlm_on_val``
    and ``budget_split``: whether (and where) every stage answers the validation images, which a
    ``learned`` gate is fitted on."""
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ValueError(
            "cascade.stages is empty: give at least one LVLM stage ({name, lvlm, gate, tau, candidates, "
            "topk, price}), or leave cascade.stages unset for the two-stage cascade with --lvlm"
        )
    out: list[StageSpec] = []
    names: set[str] = set()
    for i, entry in enumerate(raw, start=1):
        where = f"cascade.stages[{i - 1}]"
        entry = dict(entry) if isinstance(entry, dict) else entry
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping with keys {', '.join(STAGE_KEYS)}, got {entry!r}")
        unknown = sorted(set(entry) - set(STAGE_KEYS))
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; known: {', '.join(STAGE_KEYS)}")
        if entry.get("lvlm") in (None, ""):
            raise ValueError(f"{where}.lvlm is missing: give a config file path or {{class_path, init_args}}")
        gate = entry.get("gate", "margin")
        if gate not in GATES:
            raise ValueError(f"{where}.gate must be one of {', '.join(GATES)}, got {gate!r}")
        source = entry.get("candidates", "clip")
        if source not in CANDIDATE_SOURCES:
            raise ValueError(
                f"{where}.candidates must be one of {', '.join(CANDIDATE_SOURCES)}, got {source!r}"
            )
        if source == "previous" and i == 1:
            raise ValueError(
                f"{where}.candidates is 'previous' but the first LVLM stage has no previous stage: use clip"
            )
        topk = entry.get("topk", default_topk)
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= num_classes:
            raise ValueError(
                f"{where}.topk must be between 1 and the number of classes ({num_classes}), got {topk!r}"
            )
        last = i == len(raw)
        if gate == "learned" and last:
            raise ValueError(
                f"{where}.gate learned is fitted to choose the images that go on from a stage, and the last "
                f"stage has none after it: leave out {where}.gate"
            )
        if gate == "learned" and not lvlm_on_val:
            raise ValueError(
                f"{where}.gate learned is fitted on every stage's answers on the {budget_split} split: set "
                "--cascade.lvlm_on_val true (with --cascade.cost_budget or the stages' tau)"
            )
        tau = entry.get("tau")
        if tau is not None:
            try:
                tau = float(tau)
            except (TypeError, ValueError):
                raise ValueError(f"{where}.tau must be a number, got {tau!r}") from None
            if math.isnan(tau):
                raise ValueError(f"{where}.tau is NaN: give a number (uncertainty > tau goes on)")
        if cost_budget is not None and tau is not None and not last:
            raise ValueError(
                f"{where}.tau {tau:g} and cascade.cost_budget are both set, and the budget chooses every "
                f"threshold: leave out the stages' tau, or --cascade.cost_budget null"
            )
        if cost_budget is None and tau is None and not last:
            raise ValueError(
                f"{where}.tau is missing: images with uncertainty > tau go on to the next stage (or set "
                "--cascade.cost_budget to choose every threshold on the validation split)"
            )
        price = check_price(entry.get("price"), f"{where}.price")
        backend, spec = build_backend(entry["lvlm"], where, config_dirs)
        fp = backend.answer_fingerprint()
        name = str(entry.get("name") or Path(str(fp.get("model") or f"lvlm{i}")).name)
        if name in names or name == "clip":
            raise ValueError(
                f"{where}.name {name!r} is used twice (clip is stage 0's): give each stage its own name"
            )
        names.add(name)
        out.append(StageSpec(i, name, backend, spec, gate, tau, source, topk, price, where))
    for st in out[:-1]:  # every stage but the last gates on its scores (and may rank the next's candidates)
        if not gives_scores(st.backend):
            raise ValueError(
                f"{st.where} ({st.name!r}) answers in mode generate without candidate scores, which its gate "
                f"{st.gate!r} needs: set {st.where}.lvlm's init_args.mode score, or make it the last stage"
            )
    return out


def gives_scores(backend: LVLMBackend) -> bool:
    """Whether a backend's answers carry per-candidate scores (every mode but ``generate``)."""
    fp = backend.answer_fingerprint()
    return getattr(backend, "gives_scores", fp.get("mode") != "generate")


def stages_identity_hash(stages: Sequence[StageSpec]) -> str:
    text = json.dumps([s.identity() for s in stages], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


# ------------------------------------------------------------------------------------------- walking
@dataclass
class StageAnswers:
    """One stage's per-image columns (stage 0 = CLIP), in the order of the run's records."""

    name: str
    pred: np.ndarray  # int64, -1 = not answered
    uncertainty: np.ndarray  # float64, NaN = not answered / no scores
    seconds: np.ndarray  # float64, NaN = unknown
    prompt_tokens: list = field(default_factory=list)  # int or None
    completion_tokens: list = field(default_factory=list)
    usd: list = field(default_factory=list)  # float or None (unknown)
    results: dict = field(default_factory=dict)  # index -> LVLMResult (LVLM stages)


def clip_column(records: Sequence[PredictionRecord], seconds: Sequence[float], price: dict | None,
                gate: str = "entropy") -> StageAnswers:  # fmt: skip
    secs = np.asarray(seconds, dtype=np.float64)
    return StageAnswers(
        "clip",
        np.asarray([r.clip_pred for r in records], dtype=np.int64),
        np.asarray([clip_uncertainty(r, gate) for r in records], dtype=np.float64),
        secs,
        [None] * len(records),
        [None] * len(records),
        [usd_of(price, float(s), None, None) for s in secs],
    )


def stage_features(records: Sequence[PredictionRecord], answers: dict) -> np.ndarray:
    """The learned gate's features of each record's image at one LVLM stage [N, F] (columns
    :data:`cascadevlm.gating.stage_gate.FEATURES`): CLIP's entropy and top-2 probabilities; from p =
    softmax(the stage's candidate scores) p1, p2, p1 - p2 and H(p); whether its answer is CLIP's top-1;
    its answer's position among the candidates it was shown. NaN rows: no answer, or one without scores."""
    from cascadevlm.gating.stage_gate import FEATURES

    out = np.full((len(records), len(FEATURES)), np.nan)
    for j, r in enumerate(records):
        a = answers.get(r.index)
        if a is None or not a.scores:
            continue
        p = softmax(a.scores)
        if np.isnan(p).any():
            continue
        top = np.sort(p)[::-1]
        p2 = float(top[1]) if len(top) > 1 else 0.0
        cp = list(r.clip_topk_probs or [])
        ids = list(a.candidate_ids)
        out[j] = [
            float(r.entropy),
            float(cp[0]) if cp else math.nan,
            float(cp[1]) if len(cp) > 1 else 0.0,
            float(top[0]),
            p2,
            float(top[0]) - p2,
            lvlm_uncertainty(a.scores, "entropy"),
            float(a.lvlm_choice == r.clip_pred),
            float(ids.index(a.lvlm_choice)) if a.lvlm_choice in ids else float(len(ids)),
        ]
    return out


def lvlm_column(
    name: str,
    records: Sequence[PredictionRecord],
    answers: dict,
    gate: str,
    price: dict | None,
    learned=None,
) -> StageAnswers:
    """One LVLM stage's column. A ``learned`` gate's uncertainty is ``learned`` (a
    :class:`~cascadevlm.gating.stage_gate.StageGate`) on :func:`stage_features`; without one it is NaN
    until :func:`fit_learned_gates` sets it (the budget split's cross-fitted values)."""
    n = len(records)
    pred = np.full(n, -1, dtype=np.int64)
    unc = np.full(n, np.nan)
    secs = np.full(n, np.nan)
    pt, ct, usd = [None] * n, [None] * n, [None] * n
    for j, r in enumerate(records):
        a = answers.get(r.index)
        if a is None:
            continue
        pred[j] = a.lvlm_choice
        unc[j] = math.nan if gate == "learned" else lvlm_uncertainty(a.scores, gate)
        secs[j] = np.nan if a.seconds is None else a.seconds
        pt[j], ct[j] = a.prompt_tokens, a.completion_tokens
        usd[j] = usd_of(price, a.seconds, a.prompt_tokens, a.completion_tokens)
    if gate == "learned" and learned is not None:
        unc = learned.uncertainty(stage_features(records, answers))
    return StageAnswers(name, pred, unc, secs, pt, ct, usd, dict(answers))


def fit_learned_gates(
    records: Sequence[PredictionRecord], columns: Sequence[StageAnswers], stages: Sequence[StageSpec]
) -> dict[str, dict]:
    """Fit every ``learned`` gate on the budget split: ``records`` (with labels) and ``columns`` (CLIP,
    then every stage's answers to every image). Each learned stage's column gets its cross-fitted
    uncertainties (an image's from a gate fitted without it, :func:`cross_fitted_uncertainty`); returns
    the gates fitted on every answered image, by stage index (``StageGate.to_dict``), for the test split."""
    from cascadevlm.gating.stage_gate import StageGate, cross_fitted_uncertainty

    labels = np.asarray([r.label for r in records], dtype=np.int64)
    index = np.asarray([r.index for r in records], dtype=np.int64)
    fitted: dict[str, dict] = {}
    for st in stages:
        if st.gate != "learned":
            continue
        col = columns[st.index]
        x = stage_features(records, col.results)
        right = col.pred == labels
        usable = np.isfinite(x).all(1) & (labels >= 0)
        got = int(right[usable].sum())
        if got in (0, int(usable.sum())):
            raise ValueError(
                f"{st.where}.gate learned needs right and wrong answers with scores on the budget split to fit, "
                f"and stage {st.index} {st.name!r} has {got} right of {int(usable.sum())}: use another gate "
                f"({', '.join(FORMULA_GATES)})"
            )
        unc = np.full(len(records), np.nan)
        unc[usable] = cross_fitted_uncertainty(x[usable], right[usable], index[usable])
        col.uncertainty = unc
        fitted[str(st.index)] = StageGate.fit(x[usable], right[usable]).to_dict()
    return fitted


def learned_gates(fitted: dict | None) -> dict[int, object]:
    """The gates :func:`fit_learned_gates` returned (as stored in gate.json), by stage index."""
    from cascadevlm.gating.stage_gate import StageGate

    return {int(k): StageGate.from_dict(v) for k, v in (fitted or {}).items()}


def gate_uncertainty(u: np.ndarray) -> np.ndarray:
    """An answer without scores (a failed or unparseable call) counts as the most uncertain: it goes on
    (as :mod:`cascadevlm.gating.cost` reads stages.parquet)."""
    return np.where(np.isnan(u), np.inf, u)


def check_combination(combination: Sequence[int] | None, num_stages: int) -> tuple[int, ...]:
    """A combination of stages (CLIP first, then LVLM stage ids in increasing order); None: all of them."""
    combo = tuple(range(num_stages)) if combination is None else tuple(int(s) for s in combination)
    if (
        not combo
        or combo[0] != 0
        or any(b <= a for a, b in itertools.pairwise(combo))
        or combo[-1] >= num_stages
    ):
        raise ValueError(
            f"a combination of stages is 0 (CLIP) then increasing ids below {num_stages}, got {combo}"
        )
    return combo


def chain_thresholds(combination: Sequence[int], thresholds: Sequence[float], num_stages: int) -> list:
    """One threshold per stage but the last of the whole chain, for ``combination`` at ``thresholds``
    (one per stage of it but its last): its last stage and every stage after it +inf (nobody goes on,
    as in the chain itself: a combination that drops only later stages is the chain at these thresholds),
    a stage it skips before its last None (it is not asked: no threshold can say that)."""
    combo = check_combination(combination, num_stages)
    if len(thresholds) != len(combo) - 1:
        raise ValueError(f"{len(combo)} stages take {len(combo) - 1} thresholds, got {len(thresholds)}")
    out: list = [None] * (num_stages - 1)
    for s, t in zip(combo, thresholds, strict=False):
        out[s] = float(t)
    for s in range(combo[-1], num_stages - 1):
        out[s] = math.inf
    return out


def reached_stages(
    columns: Sequence[StageAnswers], thresholds: Sequence, combination: Sequence[int] | None = None
) -> np.ndarray:
    """The last stage each image reaches (0 = CLIP only): it goes on from s while uncertainty_s > t_s.
    With ``combination``, only its stages are walked (from one to the next of it; ``thresholds`` holds
    one per stage of the whole chain but its last, as :func:`chain_thresholds`, skipped stages' None)."""
    if len(thresholds) != len(columns) - 1:
        raise ValueError(f"{len(columns)} stages need {len(columns) - 1} thresholds, got {len(thresholds)}")
    combo = check_combination(combination, len(columns))
    n = len(columns[0].pred)
    last = np.zeros(n, dtype=np.int64)
    going = np.ones(n, dtype=bool)
    for a, b in itertools.pairwise(combo):
        if thresholds[a] is None:
            raise ValueError(f"stage {a} ({columns[a].name}) of combination {combo} has no threshold")
        going &= gate_uncertainty(columns[a].uncertainty) > thresholds[a]
        last[going] = b
    return last


def stage_records(
    records: Sequence[PredictionRecord],
    columns: Sequence[StageAnswers],
    thresholds: Sequence,
    combination: Sequence[int] | None = None,
) -> list[PredictionRecord]:
    """Final records of a multi-stage run: ``deferred`` = went past CLIP, ``lvlm_*`` = the answer of the
    last LVLM stage reached (None when CLIP answered), ``final`` = the cascade's answer. ``combination``:
    the stages walked (default: all; see :func:`reached_stages`)."""
    last = reached_stages(columns, thresholds, combination)
    out = []
    for j, rec in enumerate(records):
        r = copy.copy(rec)
        s = int(last[j])
        r.deferred = s > 0
        r.lvlm_choice = r.lvlm_raw = r.lvlm_scores = r.fallback = None
        if s > 0:
            a = columns[s].results.get(r.index)
            if a is None:
                raise RuntimeError(
                    f"image {r.index} reached stage {columns[s].name!r} but has no answer there"
                )
            r.lvlm_choice, r.lvlm_raw, r.lvlm_scores, r.fallback = a.lvlm_choice, a.raw, a.scores, a.fallback
        r.final = int(columns[s].pred[j]) if s > 0 else r.clip_pred
        out.append(r)
    return out


def write_stage_table(
    path: str | Path, records: Sequence[PredictionRecord], columns: Sequence[StageAnswers]
) -> Path:
    """``stages.parquet``: one row per (image, stage), atomically."""
    rows: dict[str, list] = {f.name: [] for f in STAGES_SCHEMA}
    for s, col in enumerate(columns):
        for j, rec in enumerate(records):
            answered = bool(col.pred[j] >= 0)
            rows["index"].append(rec.index)
            rows["stage"].append(s)
            rows["name"].append(col.name)
            rows["answered"].append(answered)
            rows["pred"].append(int(col.pred[j]))
            rows["uncertainty"].append(float(col.uncertainty[j]))
            rows["seconds"].append(float(col.seconds[j]) if answered else math.nan)
            rows["prompt_tokens"].append(col.prompt_tokens[j] if answered else None)
            rows["completion_tokens"].append(col.completion_tokens[j] if answered else None)
            rows["usd"].append(col.usd[j] if answered else None)
    table = pa.Table.from_pydict(rows, schema=STAGES_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def stage_cost(col: StageAnswers, unit: str) -> np.ndarray:
    """Per-image cost of one stage in ``unit`` (NaN = unknown)."""
    if unit == "seconds":
        return col.seconds.astype(np.float64)
    return np.asarray([np.nan if u is None else u for u in col.usd], dtype=np.float64)


def combination_outcome(
    columns: Sequence[StageAnswers],
    labels: np.ndarray,
    combination: Sequence[int],
    thresholds: Sequence[float],
) -> dict:
    """Accuracy, mean cost per image (seconds and usd, None when unknown), calls per stage and the
    answers of CLIP followed by the LVLM stages ``combination[1:]`` at ``thresholds``; None when a stage
    the combination sends images to has not answered them (``lvlm_on: deferred``)."""
    cols = [columns[s] for s in combination]
    last = reached_stages(cols, thresholds)
    n = len(labels)
    final = np.empty(n, dtype=np.int64)
    calls = []
    for k, col in enumerate(cols):
        reached = last >= k
        calls.append(int(reached.sum()))
        if k > 0 and (col.pred[reached] < 0).any():
            return None
        final[last == k] = col.pred[last == k]
    known = labels >= 0
    acc = float((final[known] == labels[known]).mean()) if known.any() else math.nan
    cost = {}
    for unit in COST_UNITS:
        total = np.zeros(n)
        for k, col in enumerate(cols):
            c = stage_cost(col, unit)
            total += np.where(last >= k, c, 0.0)
        cost[unit] = float(total.mean()) if n and np.isfinite(total).all() else None
    return {"acc": acc, "cost_per_image": cost, "calls": calls, "final": final}


def combinations(num_stages: int) -> list[tuple[int, ...]]:
    """CLIP followed by every ordered subset of the LVLM stages 1..S-1 (CLIP only first)."""
    lvlms = range(1, num_stages)
    return [(0, *c) for k in range(num_stages) for c in itertools.combinations(lvlms, k)]


def _mean_or_unknown(values: np.ndarray):
    if values.size == 0:
        return None
    return float(values.mean()) if np.isfinite(values).all() else "unknown"


def cost_block(
    columns: Sequence[StageAnswers], last: np.ndarray, unit: str, combination: Sequence[int] | None = None
) -> dict:
    """metrics.json's ``cost``: per stage, the images asked (``asked``; ``lvlm_on: all`` asks more than
    reach it), the images that reach it at the run's thresholds (``calls``) and the mean cost per call;
    for the cascade, the mean cost per image (the sum over the stages each image reached) in seconds
    and usd, and per 1000 images in ``unit``. "unknown" where a cost is (a missing price, seconds not
    kept), never 0. ``combination``: the stages the cascade walks (a stage it skips is reached by none)."""
    combo = set(check_combination(combination, len(columns)))
    stages = []
    totals = {u: np.zeros(len(last)) for u in COST_UNITS}
    for s, col in enumerate(columns):
        answered = col.pred >= 0
        reached = (last >= s) & (s in combo)
        row = {"stage": s, "name": col.name, "asked": int(answered.sum()), "calls": int(reached.sum())}
        for u in COST_UNITS:
            c = stage_cost(col, u)
            row[f"{u}_per_call"] = _mean_or_unknown(c[answered])
            totals[u] += np.where(reached, c, 0.0)
        for t in ("prompt_tokens", "completion_tokens"):
            got = [v for v, a in zip(getattr(col, t), answered, strict=True) if a and v is not None]
            if got:
                row[f"{t}_per_call"] = float(np.mean(got))
        stages.append(row)
    per_image = {u: _mean_or_unknown(totals[u]) for u in COST_UNITS}
    per_1000 = per_image[unit] * 1000 if isinstance(per_image[unit], float) else per_image[unit]
    return {
        "unit": unit,
        "per_image": per_image,
        "per_1000_images": per_1000,
        "calls": [row["calls"] for row in stages],
        "stages": stages,
    }
