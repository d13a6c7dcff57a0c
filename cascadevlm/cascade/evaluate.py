"""`evaluate.py`: CLIP stage -> gate -> LVLM stage on deferred images -> records, metrics, reports.

LightningCLI parses the config (``--config``, dotted overrides) and builds the CLIP module, the data
module, the trainer and, when ``lvlm`` is given, the LVLM backend. Both stages run through the same
Trainer, so 1..N devices (DDP) work for each; rank 0 merges the records once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from jsonargparse.typing import register_type
from lightning.pytorch.cli import LightningCLI

from cascadevlm import progress
from cascadevlm.cascade.lvlm_stage import (
    LVLMStage,
    check_stage_fingerprint,
    open_answer_store,
    read_answers,
    read_lvlm_calls,
    run_lvlm_stage,
    write_stage_fingerprint,
)
from cascadevlm.cascade.runner import feature_cache_hit, run_clip_stage
from cascadevlm.clip.module import ClipClassifier
from cascadevlm.data.datamodule import CascadeDataModule
from cascadevlm.gating.gate import defer_mask, tau_for_budget, tau_grid
from cascadevlm.gating.routing import RoutingOptions, apply_routing, fit_routing
from cascadevlm.logs import (
    get_logger,
)
from cascadevlm.lvlm.base import LVLMBackend, needs_retry
from cascadevlm.lvlm.prompts import LETTERS
from cascadevlm.provenance import read_provenance
from cascadevlm.records import PredictionRecord, atomic_write_text, claimed, read_records, write_records
from cascadevlm.report.analysis import deferred_analysis, sweep
from cascadevlm.report.metrics import accuracy, classification_metrics
from cascadevlm.report.plots import save_sweep_plots, sweep_references
from cascadevlm.report.summary import (
    evaluate_closing_block,
    run_name,
    short_weights,
    summary_markdown,
    write_run_outputs,
)

log = get_logger(__name__)

RANDOM_WEIGHTS_NOTE = {
    "CLIP": "The CLIP weights are random (a tiny offline model of a real architecture): accuracy here is not "
    "meaningful. For real numbers use pretrained weights, e.g. --model.model_name ViT-L-14 --model.pretrained openai.",
    "LVLM": "The LVLM weights are random (a tiny offline model of a real architecture): its answers are not "
    "meaningful. For real numbers use a pretrained LVLM, e.g. --lvlm configs/lvlm/qwen2vl_7b_score.yaml.",
}
TRAINED_DEMO_NOTE = (
    "Demo weights: small models trained here on Fashion-MNIST's train split, evaluated on its test split; "
    "not pretrained CLIP/LVLM weights."
)
DEMO_DATA = "fashion_mnist"  # what the demo weights were trained and checked on
DEMO_ON_OTHER_DATA_NOTE = (
    "Demo weights (small models trained here on Fashion-MNIST's train split, not pretrained CLIP/LVLM weights) "
    "on other data: accuracy here is not meaningful."
)


class Threshold(float):
    """An entropy threshold; on the command line also ``inf``, ``+inf``, ``-inf`` (and YAML's ``.inf``)."""


def parse_threshold(value) -> Threshold:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"expected a number, inf or -inf, got {value!r}")
    if isinstance(value, str):
        s = value.strip().lower()
        sign = -1.0 if s.startswith("-") else 1.0
        if s.lstrip("+-").lstrip(".") in ("inf", "infinity"):
            return Threshold(sign * math.inf)
        try:
            return Threshold(float(s))
        except ValueError:
            raise ValueError(f"expected a number, inf or -inf, got {value!r}") from None
    return Threshold(float(value))


register_type(Threshold, float, parse_threshold)


def join_negative_values(args: list[str]) -> list[str]:
    """``--cascade.tau -inf`` -> ``--cascade.tau=-inf``: argparse takes a value starting with ``-`` that is
    not a plain number for an option, so the README's spelling would otherwise be refused."""
    out: list[str] = []
    for a in args:
        if (
            out
            and out[-1].startswith("--")
            and "=" not in out[-1]
            and a.lower().lstrip("-").lstrip(".") in ("inf", "infinity")
        ):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


@dataclass
class CascadeOptions:
    """The gate and the LVLM stage.

    Args:
        tau: entropy threshold (nats): images with entropy > tau go to the LVLM. inf = CLIP only,
            -inf = the LVLM on every image (``inf``/``-inf`` or YAML's ``.inf``/``-.inf``).
        budget: instead of tau, send at most this fraction of images to the LVLM; tau is chosen on
            ``budget_split`` (the validation split) and then applied to the evaluated split.
        budget_split: the split tau is chosen on.
        topk: candidates shown to the LVLM (CLIP's top-k, most probable first); the CLIP stage keeps at
            least this many (``model.topk`` follows it up).
        lvlm_on: ``all`` also asks the LVLM about confident images, so the whole accuracy-vs-calls curve
            and both baselines (CLIP only, LVLM on everything) come out of one run; ``deferred`` asks only
            about deferred images (cheapest; the sweep then covers tau >= the gate's tau).
        incontext_shots: in-context examples per candidate class from the k-shot split (``data.shots``).
        max_examples: cap on in-context examples per prompt.
        lvlm_batch_size: images per LVLM batch.
        sweep_points: thresholds in the sweep (at least 2: CLIP only and the LVLM on everything).
        gate: the score an image is sent on: ``entropy`` (the paper's), ``max_prob``, ``margin`` or
            ``learned`` (fitted on ``budget_split`` records with LVLM answers: needs ``lvlm_on_val``).
            tau (or budget) is a threshold on this score.
        calibration: ``temperature``: CLIP's logits scaled by a temperature fitted on ``budget_split``
            before the gate, the candidate sets and the fusion.
        candidates: ``topk``: the LVLM's answer among CLIP's top-k; ``aps`` / ``raps``: split-conformal
            sets fitted on ``budget_split`` (coverage 1 - alpha, capped at topk); a one-class set is not sent.
        alpha: conformal miscoverage, in (0, 1).
        fusion: ``logprob``: combine CLIP's log-probabilities with the LVLM's per-candidate scores
            instead of the LVLM's answer overriding CLIP.
        fusion_weight: the LVLM's weight in [0, 1]; null = chosen on ``budget_split`` (needs ``lvlm_on_val``).
        lvlm_on_val: also ask the LVLM about every image of ``budget_split`` (one LVLM call per
            validation image); writes ``val_records.parquet`` and the gates report (``gates/``).
        allow_selection_on_eval: accept ``budget_split`` equal to ``data.split`` when something is fitted
            there (tau from a budget, temperature, conformal quantile, learned gate, fusion weight): that
            selects on the evaluated images, so the run name gets ``selOnEval`` and metrics.json
            ``params.selection_on_eval`` is true. Refused without it.
        max_failed_fraction: stop (non-zero, one line) when more than this fraction of the images asked
            to the LVLM got no answer (failed API calls), or when none got one; answers received stay
            cached for the rerun.
        stages: several LVLM stages after CLIP, in order (instead of ``lvlm``): each a mapping
            ``{name, lvlm, gate, tau, candidates, topk, price}``: ``lvlm`` a config file (relative to
            the config file) or an inline ``{class_path, init_args}``; ``gate`` margin, max_prob or
            entropy of the softmax of its candidate scores; images with that uncertainty > ``tau`` go on
            (the last stage's tau is unused); ``candidates`` clip (CLIP's top-k) or previous (the
            previous stage's top-k by its scores); ``topk``; ``price`` (see ``clip_price``). CLIP's
            threshold is ``tau``. See docs/stages.md.
        cost_budget: instead of thresholds, a cost per 1000 images (in ``cost_unit``): every stage's
            threshold is chosen on ``budget_split`` to maximise accuracy within it (needs ``stages``
            and ``lvlm_on_val``).
        cost_unit: ``seconds`` (measured wall seconds) or ``usd`` (from the price tables).
        clip_price: CLIP's price table ``{usd_per_image, usd_per_hour, ...}``; unset: unknown.
        lvlm_price: the price table of ``lvlm`` (the two-stage cascade): ``usd_per_image``,
            ``usd_per_1m_prompt_tokens``, ``usd_per_1m_completion_tokens``, ``usd_per_hour`` (any
            subset); unset: unknown (reported as such, never as 0).
    """

    tau: Threshold = Threshold(math.inf)
    budget: float | None = None
    budget_split: str = "val"
    topk: int = 5
    lvlm_on: Literal["deferred", "all"] = "all"
    incontext_shots: int = 0
    max_examples: int = 4
    lvlm_batch_size: int = 8
    sweep_points: int = 100
    gate: Literal["entropy", "max_prob", "margin", "learned"] = "entropy"
    calibration: Literal["none", "temperature"] = "none"
    candidates: Literal["topk", "aps", "raps"] = "topk"
    alpha: float = 0.1
    fusion: Literal["none", "logprob"] = "none"
    fusion_weight: float | None = None
    lvlm_on_val: bool = False
    allow_selection_on_eval: bool = False
    max_failed_fraction: float = 0.5
    stages: list[dict] | None = None
    cost_budget: float | None = None
    cost_unit: Literal["seconds", "usd"] = "seconds"
    clip_price: dict | None = None
    lvlm_price: dict | None = None


# Options added with cascade.stages: left out of metrics.json's config (and so of a study's comparison)
# while they hold their defaults, so runs made before them keep their recorded configuration.
COST_OPTION_DEFAULTS = {"stages": None, "cost_budget": None, "cost_unit": "seconds", "clip_price": None,
                        "lvlm_price": None}  # fmt: skip


MAX_SWEEP_POINTS = 10_000  # each point is a full pass over the records; more resolves nothing visible

NEEDS_VAL_ANSWERS = (
    "cascade.gate=learned / cascade.fusion=logprob without fusion_weight need LVLM answers on the validation "
    "images: set --cascade.lvlm_on_val true (one LVLM call per validation image)"
)


def routing_options(opts: CascadeOptions) -> RoutingOptions:
    """The cascade options as :class:`RoutingOptions` (what routing.py fits and applies)."""
    return RoutingOptions(
        gate=opts.gate, tau=float(opts.tau), budget=opts.budget, calibration=opts.calibration,
        candidates=opts.candidates, topk=opts.topk, alpha=opts.alpha, fusion=opts.fusion,
        fusion_weight=opts.fusion_weight,
    )  # fmt: skip


def check_options(opts: CascadeOptions, dm: CascadeDataModule, has_lvlm: bool) -> None:
    """Refuse, before any stage runs, an option that cannot be honoured (one-line ValueError each)."""
    n = len(dm.class_names)
    if dm.batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {dm.batch_size}")
    if dm.limit is not None and dm.limit < 1:
        raise ValueError(
            f"data.limit must be >= 1 (or null for every image), got {dm.limit}; set --data.limit"
        )
    if math.isnan(opts.tau):
        raise ValueError(
            "cascade.tau is NaN: give a number, inf (CLIP only) or -inf (the LVLM on every image)"
        )
    if opts.budget is not None and not 0.0 <= opts.budget <= 1.0:
        raise ValueError(f"cascade.budget must be a fraction in [0, 1], got {opts.budget}")
    if opts.topk < 1:
        raise ValueError(f"cascade.topk must be between 1 and the number of classes ({n}), got {opts.topk}")
    if opts.lvlm_batch_size < 1:
        raise ValueError(f"cascade.lvlm_batch_size must be >= 1, got {opts.lvlm_batch_size}")
    if opts.sweep_points < 2:
        raise ValueError(f"cascade.sweep_points must be >= 2, got {opts.sweep_points}")
    if opts.sweep_points > MAX_SWEEP_POINTS:
        raise ValueError(
            f"cascade.sweep_points must be <= {MAX_SWEEP_POINTS} (each point is a pass over the records), "
            f"got {opts.sweep_points}: set --cascade.sweep_points"
        )
    if opts.budget is not None and opts.tau != math.inf:
        # the budget chooses tau: a tau given beside it (e.g. on the command line over a config's budget)
        # would be dropped without a word
        raise ValueError(
            f"cascade.tau {opts.tau:g} and cascade.budget {opts.budget:g} are both set, and the budget "
            "chooses tau: give one, e.g. --cascade.budget null to use the tau"
        )
    if not 0.0 <= opts.max_failed_fraction <= 1.0:
        raise ValueError(
            f"cascade.max_failed_fraction must be a fraction in [0, 1], got {opts.max_failed_fraction}"
        )
    if opts.incontext_shots < 0:
        raise ValueError(f"cascade.incontext_shots must be >= 0, got {opts.incontext_shots}")
    if opts.max_examples < 0:
        raise ValueError(f"cascade.max_examples must be >= 0, got {opts.max_examples}")
    if not 0.0 < opts.alpha < 1.0:
        raise ValueError(f"cascade.alpha must be in (0, 1) (target coverage 1 - alpha), got {opts.alpha}")
    if opts.fusion_weight is not None and not 0.0 <= opts.fusion_weight <= 1.0:
        raise ValueError(
            f"cascade.fusion_weight must be in [0, 1] (1 = the LVLM decides), got {opts.fusion_weight}"
        )
    check_cost_options(opts, has_lvlm)
    ro = routing_options(opts)
    ro.validate()
    if selects_on_eval(opts, dm.split, has_lvlm) and not opts.allow_selection_on_eval:
        raise ValueError(
            f"cascade.budget_split is the evaluated split data.split {dm.split!r}: tau (and any fitted "
            "routing) would be chosen on the very images the accuracy is measured on; set "
            "--cascade.budget_split to another split (e.g. val), or --cascade.allow_selection_on_eval true "
            "to accept it (marked in the run name and metrics.json)"
        )
    if not has_lvlm and not ro.is_paper_cascade():
        raise ValueError(
            "cascade.gate/calibration/candidates/fusion route images to an LVLM but none is configured: "
            "set --lvlm, or keep --cascade.gate entropy --cascade.calibration none --cascade.candidates topk "
            "--cascade.fusion none"
        )
    if not has_lvlm and opts.lvlm_on_val:
        raise ValueError(
            "cascade.lvlm_on_val asks an LVLM about the validation images but none is configured: set --lvlm"
        )
    if not has_lvlm:
        return
    if opts.topk > n:  # only the LVLM is shown candidates; CLIP alone works with any class count
        raise ValueError(f"cascade.topk must be between 1 and the number of classes ({n}), got {opts.topk}")
    if opts.incontext_shots > 0 and dm.shots < 1:
        raise ValueError("cascade.incontext_shots needs a k-shot split: set data.shots >= 1")
    train_split = getattr(dm, "train_split", "train")
    if opts.incontext_shots > 0 and train_split not in dm.dsd:
        raise ValueError(
            f"dataset {dm.name!r} has no split {train_split!r} to draw k-shot images from (cascade.incontext_shots); "
            f"it has {list(dm.dsd)}: set --data.train_split"
        )
    if opts.budget is not None and opts.budget_split not in dm.dsd:
        raise ValueError(
            f"dataset {dm.name!r} has no split {opts.budget_split!r} to choose tau on (cascade.budget_split); "
            f"it has {list(dm.dsd)}: set --cascade.budget_split, or give tau: --cascade.budget null --cascade.tau X"
        )
    if (
        opts.lvlm_on_val or (not ro.is_paper_cascade() and ro.needs_val())
    ) and opts.budget_split not in dm.dsd:
        raise ValueError(
            f"dataset {dm.name!r} has no split {opts.budget_split!r} to fit the routing on (cascade.budget_split); "
            f"it has {list(dm.dsd)}: set --cascade.budget_split"
        )
    if ro.needs_val_answers() and not opts.lvlm_on_val:
        raise ValueError(NEEDS_VAL_ANSWERS)


def check_cost_options(opts: CascadeOptions, has_lvlm: bool) -> None:
    """The cost options' refusals that need no stage built (one line each)."""
    from cascadevlm.cascade.stages import check_price

    check_price(opts.clip_price, "cascade.clip_price")
    check_price(opts.lvlm_price, "cascade.lvlm_price")
    if opts.stages is not None and opts.lvlm_price is not None:
        raise ValueError(
            "cascade.lvlm_price prices the top-level lvlm; with cascade.stages give each stage's price "
            "(cascade.stages[i].price): --cascade.lvlm_price null"
        )
    if opts.lvlm_price is not None and not has_lvlm:
        raise ValueError(
            "cascade.lvlm_price prices the LVLM, and this run has none: --cascade.lvlm_price null"
        )
    if opts.cost_budget is None:
        if opts.stages is not None and opts.budget is not None:
            raise ValueError(
                "cascade.budget chooses one threshold (a fraction sent to one LVLM); with cascade.stages give "
                "cascade.tau and each stage's tau, or --cascade.cost_budget: --cascade.budget null"
            )
        return
    if not (opts.cost_budget > 0 and math.isfinite(opts.cost_budget)):
        raise ValueError(
            f"cascade.cost_budget must be a positive cost per 1000 images (in cascade.cost_unit "
            f"{opts.cost_unit}), got {opts.cost_budget}"
        )
    if opts.budget is not None or opts.tau != math.inf:
        given = f"cascade.budget {opts.budget:g}" if opts.budget is not None else f"cascade.tau {opts.tau:g}"
        flag = "--cascade.budget null" if opts.budget is not None else "--cascade.tau inf"
        raise ValueError(
            f"{given} and cascade.cost_budget {opts.cost_budget:g} are both set, and the cost budget chooses "
            f"every threshold: give one, e.g. {flag}"
        )
    if opts.stages is None:
        raise ValueError(
            "cascade.cost_budget chooses the thresholds of cascade.stages: give the LVLM as a stage "
            "(--cascade.stages '[{name: ..., lvlm: ...}]' and --lvlm null), or --cascade.cost_budget null"
        )
    if not opts.lvlm_on_val:
        raise ValueError(
            f"cascade.cost_budget chooses the thresholds on the {opts.budget_split} split from every stage's "
            "answers there: set --cascade.lvlm_on_val true (each LVLM stage is asked about every validation "
            "image)"
        )


def selects_on_eval(opts: CascadeOptions, split: str, has_lvlm: bool) -> bool:
    """Whether this run fits something (tau from a budget, calibration, conformal sets, a learned gate,
    a fusion weight, val answers) on ``budget_split`` and that split is the evaluated one."""
    if not has_lvlm or opts.budget_split != split:
        return False
    ro = routing_options(opts)
    return (
        opts.budget is not None
        or opts.cost_budget is not None
        or opts.lvlm_on_val
        or (not ro.is_paper_cascade() and ro.needs_val())
    )


def weight_notes(model: ClipClassifier, backend: LVLMBackend | None, dataset: str | None = None) -> list[str]:
    """Notes from the weights' provenance marks (never guessed from a name): random or demo weights (the
    demo's note names its data: only for ``dataset`` fashion_mnist)."""
    clip_mark = getattr(model.bundle, "provenance", None) or read_provenance(model.hparams.pretrained)
    lvlm_mark = None
    if backend is not None:
        path = backend.answer_fingerprint().get("model")
        lvlm_mark = read_provenance(path) if isinstance(path, str) and Path(path).exists() else None
    notes = []
    if not model.hparams.pretrained or (clip_mark or {}).get("kind") == "random":
        notes.append(RANDOM_WEIGHTS_NOTE["CLIP"])
    if (lvlm_mark or {}).get("kind") == "random":
        notes.append(RANDOM_WEIGHTS_NOTE["LVLM"])
    if "trained-demo" in ((clip_mark or {}).get("kind"), (lvlm_mark or {}).get("kind")):
        notes.append(TRAINED_DEMO_NOTE if dataset == DEMO_DATA else DEMO_ON_OTHER_DATA_NOTE)
    return notes


def _lvlm_description(cfg) -> dict | None:
    lv = cfg.get("lvlm")
    if not lv:
        return None
    lv = lv.as_dict() if hasattr(lv, "as_dict") else lv
    return json.loads(json.dumps(lv, default=str))


def _short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def adapter_params(model: ClipClassifier) -> dict | None:
    """The adapter's method, k and seed, read from the adapter file itself (None without an adapter)."""
    if not model.hparams.adapter:
        return None
    from cascadevlm.clip.adapters import adapter_info

    info = adapter_info(model.hparams.adapter)
    mix = float(getattr(model.hparams, "adapter_mix", 1.0))  # WiSE-FT-style mixing with zero-shot
    return {"method": info["method"], "shots": info["shots"], "seed": info["seed"],
            "selection": info["selection"], "mix": mix}  # fmt: skip


def default_run_name(
    dm: CascadeDataModule,
    model: ClipClassifier,
    backend: LVLMBackend | None,
    opts: CascadeOptions | None = None,
    overridden: bool = False,
    precision: str | None = None,
    stages: list | None = None,
) -> str:
    """A run directory name from everything that changes the result, so runs never overwrite each other:
    data (dataset, split, limit), CLIP (model, weights, precision, adapter method/k/seed from the adapter
    file, a hash of overridden class names/templates), LVLM (model, mode, a hash of its other
    answer-changing settings) and cascade (tau or budget, lvlm_on, topk, in-context shots)."""
    hp = model.hparams
    opts = opts or CascadeOptions()
    ad = adapter_params(model)
    if ad:
        setting = [ad["method"], f"k{ad['shots']}" if ad["shots"] is not None else None,
                   f"s{ad['seed']}" if ad["seed"] is not None else None,
                   f"sel{ad['selection']}" if ad["selection"] not in (None, "val_split") else None,
                   f"mix{ad['mix']:g}" if ad["mix"] != 1.0 else None]  # fmt: skip
    else:
        setting = [f"k{dm.shots}", f"s{dm.seed}" if dm.shots else None]
    prec = [p for p in (hp.precision, precision) if p and p not in ("fp32", "32-true", "32")]
    parts: list = [dm.name, hp.model_name, short_weights(hp.pretrained), *prec, dm.split, *setting]
    if overridden:
        parts.append(f"cls{_short_hash([dm.class_names, model.templates])}")
    if backend is not None:
        fp = backend.answer_fingerprint()
        rest = {k: v for k, v in fp.items() if k not in ("model", "mode", "backend")}
        gate = f"budget{opts.budget:g}-{opts.budget_split}" if opts.budget is not None else f"tau{opts.tau:g}"
        parts += [Path(str(fp.get("model") or fp["backend"])).name, fp.get("mode"), f"lv{_short_hash(rest)}",
                  gate, opts.lvlm_on, f"top{opts.topk}",
                  _incontext_part(opts)]  # fmt: skip
        parts += routing_name_parts(opts)
        parts.append("selOnEval" if selects_on_eval(opts, dm.split, True) else None)
    if not stages:  # prices and the unit change the run's costs (metrics.json, stages.parquet)
        parts += [f"clip{_short_hash(opts.clip_price)}" if opts.clip_price else None,
                  f"lvp{_short_hash(opts.lvlm_price)}" if opts.lvlm_price else None]  # fmt: skip
    if opts.cost_unit != "seconds" and opts.cost_budget is None:  # with a budget, its gate part names it
        parts.append(opts.cost_unit)
    if stages:
        from cascadevlm.cascade.stages import stages_identity_hash

        if opts.cost_budget is not None:
            # "-combos": the budget chooses the combination of stages too (runs before chose the whole chain)
            gate = f"cost{opts.cost_budget:g}{opts.cost_unit[0]}-{opts.budget_split}-combos"
        else:
            gate = f"tau{opts.tau:g}"
        parts += ["stages-" + "+".join(st.name for st in stages), f"st{stages_identity_hash(stages)}", gate,
                  opts.lvlm_on, f"top{opts.topk}", _incontext_part(opts),
                  f"clip{_short_hash(opts.clip_price)}" if opts.clip_price else None,
                  "selOnEval" if selects_on_eval(opts, dm.split, True) else None]  # fmt: skip
    parts.append(f"n{dm.limit}" if dm.limit else None)
    return run_name(*parts)


def _incontext_part(opts: CascadeOptions) -> str | None:
    """In-context shots, and the cap on examples per prompt where it is not the default (it changes the
    prompts, so the answers)."""
    if not opts.incontext_shots:
        return None
    cap = f"max{opts.max_examples}" if opts.max_examples != CascadeOptions.max_examples else ""
    return f"ic{opts.incontext_shots}{cap}"


def routing_name_parts(opts: CascadeOptions) -> list[str | None]:
    """Run-name parts of the routing options; none for the paper's cascade (its names stay as they were)."""
    if routing_options(opts).is_paper_cascade():
        return []
    fw = "val" if opts.fusion_weight is None else f"{opts.fusion_weight:g}"
    return [
        f"g{opts.gate}" if opts.gate != "entropy" else None,
        "temp" if opts.calibration == "temperature" else None,
        f"{opts.candidates}{opts.alpha:g}" if opts.candidates != "topk" else None,
        f"fuse{fw}" if opts.fusion == "logprob" else None,
    ]


def _with_split(dm: CascadeDataModule, split: str) -> CascadeDataModule:
    other = copy.copy(dm)
    other.split, other.limit = split, None
    if split not in dm.dsd:
        raise ValueError(
            f"dataset {dm.name!r} has no split {split!r} to choose tau on; it has {list(dm.dsd)}"
        )
    return other


def combine(
    clip_records: list[PredictionRecord], answers: dict, tau: float, topk: int
) -> list[PredictionRecord]:
    """Final records: the LVLM's answer where the gate deferred, CLIP's top-1 elsewhere.

    Answers for confident images (``lvlm_on: all``) are kept in the record for sweeps but not used.
    """
    out = []
    deferred = defer_mask([r.entropy for r in clip_records], tau)
    for rec, d in zip(clip_records, deferred, strict=True):
        r = copy.copy(rec)
        r.deferred = bool(d)
        a = answers.get(r.index)
        if a is not None:
            if a.candidate_ids != r.clip_topk[:topk]:
                raise RuntimeError(f"stored LVLM answer for image {r.index} was given other candidates")
            r.lvlm_choice, r.lvlm_raw, r.lvlm_scores, r.fallback = a.lvlm_choice, a.raw, a.scores, a.fallback
        elif d:
            raise RuntimeError(f"image {r.index} was deferred but has no LVLM answer")
        r.final = r.lvlm_choice if d else r.clip_pred
        out.append(r)
    return out


@dataclass
class Run:
    """One parsed evaluation: what the steps below share."""

    cli: LightningCLI
    opts: CascadeOptions
    backend: LVLMBackend | None
    run_dir: Path
    notes: list[str]
    stages: list | None = None  # cascade.stages, checked and built (StageSpec); None: the two-stage cascade

    @property
    def rank0(self) -> bool:
        return self.cli.trainer.is_global_zero


def prepare(cli: LightningCLI) -> Run:
    """Check every option, name the run and make the CLIP stage keep ``cascade.topk`` candidates."""
    cfg, model, dm = cli.config, cli.model, cli.datamodule
    backend: LVLMBackend | None = cli.config_init.get("lvlm")
    opts = CascadeOptions(**dict(cfg.cascade))
    if opts.stages is not None and backend is not None:
        raise ValueError(
            "cascade.stages and lvlm are both set: the stages list every LVLM in order; give the LVLM as a "
            "stage and --lvlm null, or --cascade.stages null for the two-stage cascade"
        )
    check_options(opts, dm, backend is not None or opts.stages is not None)
    stages = prepare_stages(cfg, opts, dm) if opts.stages is not None else None
    if opts.cost_unit == "usd":
        check_usd_prices(opts, stages, backend)
    # The records keep model.topk ids; the LVLM is shown cascade.topk of them: keep enough.
    model.hparams.topk = max(model.hparams.topk, opts.topk, *(st.topk for st in stages or []))
    if backend is not None:
        _check_prompt(backend, opts.topk, dm, "--cascade.topk", "--lvlm.init_args.prompt.options names")
    for st in stages or []:
        _check_prompt(
            st.backend, st.topk, dm, f"{st.where}.topk", f"{st.where}.lvlm's init_args.prompt.options names"
        )
    data_cfg = cfg.get("data") or {}
    overridden = bool(data_cfg.get("class_names") or data_cfg.get("templates"))
    overridden = overridden or getattr(dm, "prompt_names_changed", False)  # readable folder names
    name = cfg.run_name or default_run_name(
        dm,
        model,
        backend,
        opts,
        overridden,
        str(cli.trainer.precision) if hasattr(cli.trainer, "precision") else None,
        stages,
    )
    notes = weight_notes(model, backend, dm.name)
    for st in stages or []:
        notes += [n for n in weight_notes(model, st.backend, dm.name) if n not in notes]
    return Run(cli, opts, backend, Path(cfg.output_dir) / name, notes, stages)


def _check_prompt(
    backend: LVLMBackend, topk: int, dm: CascadeDataModule, topk_flag: str, names_flag: str
) -> None:
    """Lettered options stop at Z (refused here, not at the first prompt); a default prompt's noun
    follows the dataset."""
    prompt = getattr(backend, "prompt", None)
    if getattr(prompt, "options", None) == "letters" and topk > len(LETTERS):  # else: at its 1st prompt
        raise ValueError(
            f"{topk_flag.lstrip('-')} is {topk} but lettered options stop at {len(LETTERS)} (A-Z): set {topk_flag} "
            f"<= {len(LETTERS)}, or name the options ({names_flag})"
        )
    if (
        prompt is not None
        and getattr(prompt, "dataset", None) is None
        and getattr(prompt, "noun", None) == "object"
    ):
        prompt.noun = dm.noun  # dataset-aware wording ("aircraft variant") unless the config set one


def _config_dirs(cfg) -> list[Path]:
    """Directories of the ``--config`` files, the last first (a stage's config file is relative to them)."""
    dirs = []
    for c in reversed(list(cfg.get("config") or [])):
        path = getattr(c, "absolute", None) or getattr(c, "relative", None) or str(c)
        dirs.append(Path(str(path)).parent)
    return dirs


def prepare_stages(cfg, opts: CascadeOptions, dm: CascadeDataModule) -> list:
    """``cascade.stages`` checked and built (one-line refusals before any stage runs)."""
    from cascadevlm.cascade.stages import parse_stages

    if not routing_options(opts).is_paper_cascade():
        raise ValueError(
            "cascade.stages gates CLIP on its entropy and each LVLM stage on its own gate: keep --cascade.gate "
            "entropy --cascade.calibration none --cascade.candidates topk --cascade.fusion none"
        )
    raw = [s.as_dict() if hasattr(s, "as_dict") else s for s in opts.stages]
    return parse_stages(raw, _config_dirs(cfg), opts.topk, len(dm.class_names), opts.cost_budget,
                        opts.lvlm_on_val, opts.budget_split)  # fmt: skip


def check_usd_prices(opts: CascadeOptions, stages: list | None, backend: LVLMBackend | None) -> None:
    """``cascade.cost_unit usd`` needs every stage's price (CLIP's too): the first one missing, in one line."""
    if opts.clip_price is None:
        raise ValueError(
            "cascade.cost_unit usd needs every stage's price, and stage 0 'clip' has none: set "
            "--cascade.clip_price '{usd_per_hour: ...}' (or usd_per_image), or --cascade.cost_unit seconds"
        )
    for st in stages or []:
        if st.price is None:
            raise ValueError(
                f"cascade.cost_unit usd needs every stage's price, and stage {st.index} {st.name!r} has none: set "
                f"{st.where}.price (usd_per_image, usd_per_1m_prompt_tokens, usd_per_1m_completion_tokens or "
                "usd_per_hour), or --cascade.cost_unit seconds"
            )
    if backend is not None and opts.lvlm_price is None:
        raise ValueError(
            "cascade.cost_unit usd needs every stage's price, and stage 1 (lvlm) has none: set "
            "--cascade.lvlm_price '{usd_per_image: ...}', or --cascade.cost_unit seconds"
        )


def clip_and_gate(run: Run) -> tuple[list[PredictionRecord], dict, set[int] | None]:
    """The CLIP stage (and on the budget split when tau comes from a budget or the routing is fitted
    there, with the LVLM too under ``lvlm_on_val``); every rank gets the records, the gate and, for
    routing other than the paper's, the indices of the images it sends (None: the entropy gate decides)."""
    cfg, model, dm, trainer = run.cli.config, run.cli.model, run.cli.datamodule, run.cli.trainer
    opts, run_dir = run.opts, run.run_dir
    ro = routing_options(opts)
    paper = ro.is_paper_cascade()
    with progress.stage(trainer, f"CLIP stage: {dm.split}"):
        clip_records = run_clip_stage(trainer, model, dm, run_dir / "parts", cfg.cache_dir)
    tau, gate = float(opts.tau), {"tau": float(opts.tau), "source": "config"}
    sent_path = run_dir / "parts" / "routing_sent.json"
    val_path = run_dir / "val_records.parquet"
    val_records: list[PredictionRecord] | None = None
    if run.backend is not None and (
        opts.budget is not None or opts.lvlm_on_val or (not paper and ro.needs_val())
    ):
        val_dm = _with_split(dm, opts.budget_split)
        purpose = "for the budget" if opts.budget is not None else "for the routing"
        with progress.stage(trainer, f"CLIP stage: {val_dm.split} ({purpose})"):
            val_records = run_clip_stage(trainer, model, val_dm, run_dir / "parts" / "budget", cfg.cache_dir)
        val_answers: dict = {}
        if opts.lvlm_on_val:  # every validation image: its own parts and fingerprint
            val_answers, _ = lvlm_stage(
                run, val_records, -math.inf, dm=val_dm, parts=run_dir / "parts" / "val"
            )
            check_failed_answers(val_answers, opts.max_failed_fraction, val_dm.split)
        if run.rank0 and (opts.lvlm_on_val or not paper):
            write_records(val_path, combine(val_records, val_answers, math.inf, opts.topk))
    if run.backend is None:
        tau, gate = math.inf, {"tau": math.inf, "source": "no LVLM configured: CLIP only"}
    elif not paper:
        if run.rank0:
            # fitted on the records as stored, so report() refits exactly the same routing
            write_records(run_dir / "clip_records.parquet", clip_records)
            fit = fit_routing(read_records(val_path) if val_path.exists() else None, ro, len(dm.class_names))
            sent, _ = fit.decide(read_records(run_dir / "clip_records.parquet"))
            tau = fit.threshold
            gate = {"tau": tau, "source": fit.threshold_source, "score": opts.gate}
            if val_path.exists() and opts.budget is not None:
                val_sent, _ = fit.decide(read_records(val_path))
                gate["budget_split_deferral"] = float(val_sent.mean()) if len(val_sent) else 0.0
            sent_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                sent_path, json.dumps([r.index for r, x in zip(clip_records, sent, strict=True) if x])
            )
    elif opts.budget is not None:
        if run.rank0:
            tau = tau_for_budget([r.entropy for r in val_records], opts.budget)
            frac = float(defer_mask([r.entropy for r in val_records], tau).mean())
            gate = {
                "tau": tau,
                "source": f"budget {opts.budget} on {opts.budget_split}",
                "budget_split_deferral": frac,
            }
    if run.rank0:
        write_records(run_dir / "clip_records.parquet", clip_records)
        atomic_write_text(run_dir / "gate.json", json.dumps(gate, default=str))
    trainer.strategy.barrier()
    clip_records = read_records(run_dir / "clip_records.parquet")
    gate = json.loads((run_dir / "gate.json").read_text())
    sent_ids = set(json.loads(sent_path.read_text())) if not paper and run.backend is not None else None
    return clip_records, gate, sent_ids


def stage_fingerprint(
    run: Run,
    dm: CascadeDataModule | None = None,
    backend: LVLMBackend | None = None,
    topk: int | None = None,
    stage: dict | None = None,
) -> dict:
    """Everything that changes an LVLM answer (never connection settings): the backend's answer
    settings, the candidates' source (CLIP identity incl. precision, adapter content, class names,
    templates), the data rows and the cascade's prompt options. A stage of ``cascade.stages`` passes its
    ``backend``, ``topk`` and ``stage`` (its position and candidate source, with the previous stage's
    fingerprint digest when its candidates are the previous stage's top-k)."""
    model, opts = run.cli.model, run.opts
    backend = backend or run.backend
    dm = dm or run.cli.datamodule
    hp = model.hparams
    bundle = model.bundle
    identity = (
        bundle.feature_identity()
        if hasattr(bundle, "feature_identity")
        else [hp.model_name, bundle.weights_id]
    )
    adapter = hashlib.sha256(Path(hp.adapter).read_bytes()).hexdigest() if hp.adapter else None
    from cascadevlm.clip.features import dataset_fingerprint

    return {
        "lvlm": backend.answer_fingerprint(),
        "clip": {
            "identity": identity,
            "precision": hp.precision,
            "adapter": adapter,
            **({"adapter_mix": hp.adapter_mix} if getattr(hp, "adapter_mix", 1.0) != 1.0 else {}),
            "trainer_precision": str(getattr(run.cli.trainer, "precision", None)),
            "templates": list(model.templates),
        },  # fmt: skip
        "data": {
            "dataset": dm.name,
            "split": dm.split,
            "limit": dm.limit,
            "rows": dm.eval_fingerprint()
            if getattr(dm, "streaming", False)
            else dataset_fingerprint(dm.eval_dataset()),
            "class_names": list(dm.class_names),
            "noun": dm.noun,
            "shots": dm.shots,
            "seed": dm.seed,
        },  # fmt: skip
        **({"stage": stage} if stage is not None else {}),
        "cascade": {
            "topk": opts.topk if topk is None else topk,
            "incontext_shots": opts.incontext_shots,
            "max_examples": opts.max_examples,
            # answers stored before queries stopped being their own example are not reused
            **(
                {"incontext_query_excluded": True}
                if opts.incontext_shots and dm.split == dm.train_split
                else {}
            ),  # fmt: skip
        },
    }


def lvlm_stage(
    run: Run,
    clip_records: list[PredictionRecord],
    tau: float,
    sent: set[int] | None = None,
    dm: CascadeDataModule | None = None,
    parts: Path | None = None,
    stage=None,
    wanted: list[PredictionRecord] | None = None,
    candidates: dict[int, list[int]] | None = None,
    stage_info: dict | None = None,
) -> tuple[dict, dict]:
    """Ask the LVLM about the images without a usable answer yet (resumable); returns the answers by
    image index and the call counts ``{"total": all ranks and attempts, "this_attempt": ...}``.

    ``sent``: the images the routing sends (``lvlm_on: deferred``), instead of entropy > tau;
    ``dm``/``parts``: another split (the validation images of ``lvlm_on_val``, all of them asked).
    ``stage`` (a :class:`~cascadevlm.cascade.stages.StageSpec` of ``cascade.stages``): its backend and
    top-k, the images ``wanted`` and their ``candidates``; ``stage_info`` goes into the fingerprint."""
    trainer, opts = run.cli.trainer, run.opts
    backend = stage.backend if stage is not None else run.backend
    topk = stage.topk if stage is not None else opts.topk
    other_split = dm is not None
    dm = dm or run.cli.datamodule
    parts = parts or run.run_dir / "parts"
    fingerprint = stage_fingerprint(run, dm, backend, topk, stage_info)
    check_stage_fingerprint(parts, fingerprint)  # every rank: read-only
    trainer.strategy.barrier()
    answers = read_answers(parts)
    calls_before = read_lvlm_calls(parts)
    if wanted is None:  # a stage of cascade.stages passes its own
        if other_split or opts.lvlm_on == "all":
            wanted = clip_records
        elif sent is not None:
            wanted = [r for r in clip_records if r.index in sent]
        else:
            mask = defer_mask([r.entropy for r in clip_records], tau)
            wanted = [r for r, d in zip(clip_records, mask, strict=True) if d]
    # answers that are failed API calls are asked again
    todo = [r for r in wanted if r.index not in answers or needs_retry(answers[r.index].fallback)]
    retried = sum(r.index in answers for r in todo)
    title = f"LVLM stage {stage.index} ({stage.name})" if stage is not None else "LVLM stage"
    if run.rank0:
        label = f"{title} ({dm.split} split)" if other_split else title
        log.info(f"{label}: {len(wanted)} images, {len(wanted) - len(todo)} answered before, {len(todo)} to ask"
                 + (f" ({retried} failed calls asked again)" if retried else ""))  # fmt: skip
        if todo:
            write_stage_fingerprint(parts, fingerprint)
    trainer.strategy.barrier()
    exemplars = None
    if opts.incontext_shots > 0:
        from cascadevlm.lvlm.incontext import ExemplarPool

        exemplars = ExemplarPool(
            dm.dsd[dm.train_split], dm.kshot_split(), dm.class_names,
            shots_per_class=min(opts.incontext_shots, dm.shots), max_examples=opts.max_examples,
            queries_from_pool_split=dm.split == dm.train_split,
        )  # fmt: skip
    cfg = run.cli.config
    store = open_answer_store(cfg.get("answer_store", "auto"), cfg.cache_dir)  # answers of earlier runs
    module = LVLMStage(backend, dm.class_names, exemplars, store)
    counts = progress.LVLMCounts(backend, len(wanted) - len(todo))
    own_bar = bool(getattr(backend, "progress", False)) and hasattr(backend, "begin_stage")  # the API's bar
    with progress.stage(trainer, f"{title}: {dm.split}" if other_split else title, counts, not own_bar):
        run_lvlm_stage(trainer, module, dm.eval_dataset(), todo, topk, dm.split, parts,
                       opts.lvlm_batch_size, dm.num_workers, candidates=candidates)  # fmt: skip
    trainer.strategy.barrier()
    total = read_lvlm_calls(parts)
    return read_answers(parts), {"total": total, "this_attempt": total - calls_before}


class LVLMFailedError(RuntimeError):
    """Too many LVLM calls failed: the run stops rather than report CLIP's answers under the LVLM's name."""


def check_failed_answers(answers: dict, max_fraction: float, split: str = "") -> None:
    """Raise :class:`LVLMFailedError` (every rank: all read the same part files) when no LVLM answer
    succeeded, or more than ``max_fraction`` of them are failed calls; the answers stay in the part files
    and the API cache, so the rerun asks only the failed images again."""
    failed = sum(bool(needs_retry(a.fallback)) for a in answers.values())
    if not answers or not failed:
        return
    where = f" on the {split} split" if split else ""
    if failed == len(answers) or failed / len(answers) > max_fraction:
        head = (
            f"none of the {failed} LVLM calls{where} succeeded"
            if failed == len(answers)
            else f"{failed} of {len(answers)} LVLM calls{where} failed, more than cascade.max_failed_fraction "
            f"{max_fraction:g}"
        )
        raise LVLMFailedError(
            f"{head} (the records would hold CLIP's top-1 under the LVLM's name); the answers received are "
            "cached: rerun the same command once the LVLM answers (it asks only the failed images), or raise "
            "--cascade.max_failed_fraction"
        )


def report(run: Run, clip_records: list[PredictionRecord], answers: dict, gate: dict, calls: dict) -> dict:
    """Final records and everything computed from them: metrics, sweep, summary, plots, TensorBoard."""
    cfg, model, dm, trainer, opts, backend = (run.cli.config, run.cli.model, run.cli.datamodule,
                                               run.cli.trainer, run.opts, run.backend)  # fmt: skip
    hp, run_dir, notes = model.hparams, run.run_dir, run.notes
    tau = float(gate["tau"])
    num_classes = len(dm.class_names)
    ro = routing_options(opts)
    routing_info = None
    val_path = run_dir / "val_records.parquet"
    if backend is None or ro.is_paper_cascade():
        records = combine(clip_records, answers, tau, opts.topk)
    else:
        val_records = read_records(val_path) if val_path.exists() else None
        records, routing_info = apply_routing(
            combine(clip_records, answers, math.inf, opts.topk), val_records, ro, num_classes
        )
    metrics = classification_metrics(records, num_classes)
    labelled = [r for r in records if r.label >= 0]  # images of unknown class count in no accuracy
    labels = [r.label for r in labelled]
    methods = {
        "clip": {"acc1": metrics.get("clip_acc1", float("nan")), "deferral": 0.0},
        "cascade": {"acc1": metrics.get("acc1", float("nan")), "deferral": float(sum(r.deferred for r in records)) / max(len(records), 1), "tau": tau},
    }  # fmt: skip
    if hp.adapter:  # the adapter's accuracy is "clip"; zero-shot CLIP beside it
        zs = [r.clip_zero_shot_pred for r in labelled]
        methods["clip_zero_shot"] = {"acc1": accuracy(zs, labels, num_classes), "deferral": 0.0}
    if backend is not None and all(r.lvlm_choice is not None for r in records):
        methods["lvlm_all"] = {
            "acc1": accuracy([r.lvlm_choice for r in labelled], labels, num_classes),
            "deferral": 1.0,
        }
    if backend is None:
        methods.pop("cascade")
    taus = tau_grid([r.entropy for r in labelled], opts.sweep_points)
    sweep_rows = sweep(records, num_classes, taus) if backend is not None else []
    ad = adapter_params(model)
    lvlm_fp = backend.answer_fingerprint() if backend is not None else {}
    params = {
        "dataset": dm.name,
        "split": dm.split,
        "images": len(records),
        "classes": num_classes,
        "clip_model": hp.model_name,
        "clip_pretrained": hp.pretrained,
        "clip_precision": hp.precision,
        "adapter": hp.adapter,
        "adapter_method": ad["method"] if ad else None,
        "adapter_selection": ad["selection"] if ad else None,  # model selection of its training
        "adapter_mix": ad["mix"] if ad else None,
        # k and seed of the adapter file when there is one (never the data.shots default)
        "shots": ad["shots"] if ad and ad["shots"] is not None else dm.shots,
        "seed": ad["seed"] if ad and ad["seed"] is not None else dm.seed,
        "lvlm": lvlm_fp.get("backend"),
        "lvlm_model": lvlm_fp.get("model"),
        "lvlm_mode": lvlm_fp.get("mode"),
        "tau": tau,
        "gate": gate["source"],
        "lvlm_on": opts.lvlm_on if backend is not None else None,
        "topk": opts.topk,
        "incontext_shots": opts.incontext_shots,
        "gate_score": opts.gate,
        "calibration": opts.calibration,
        "candidates": opts.candidates,
        "alpha": opts.alpha,
        "fusion": opts.fusion,
        "fusion_weight": (routing_info or {}).get("fusion_weight", opts.fusion_weight),
        "lvlm_on_val": opts.lvlm_on_val,
        # tau / the routing fitted on the evaluated images themselves (cascade.allow_selection_on_eval)
        "selection_on_eval": selects_on_eval(opts, dm.split, backend is not None),
        "lvlm_calls_val": calls.get("val", 0),  # the validation images of lvlm_on_val
        "lvlm_calls": calls["total"],  # every rank, every attempt of this run
        "lvlm_calls_this_attempt": calls["this_attempt"],
        "lvlm_api_errors": sum(bool(needs_retry(r.fallback)) for r in records),
        "devices": trainer.world_size,
    }
    payload = {
        "params": params,
        "metrics": metrics,
        "methods": methods,
        "gate": gate,
        # what the zero-shot head and the LVLM's prompts were built from (after overrides and card templates)
        "class_names": list(model.class_names or dm.class_names),
        "templates": list(model.templates),
        "config": _config_dict(cfg),
    }
    if routing_info is not None:
        payload["routing"] = routing_info
    cost = two_stage_costs(run, records, answers)
    if cost is not None:
        payload["cost"] = cost
    if backend is not None:
        payload["deferred"] = deferred_analysis(records, num_classes, opts.topk)
    paths = write_run_outputs(run_dir, records, payload, notes, sweep_rows)
    if sweep_rows:
        op = {"tau": tau, "deferral": methods["cascade"]["deferral"], "acc1": methods["cascade"]["acc1"]}
        refs = sweep_references(methods, num_classes)
        save_sweep_plots(sweep_rows, run_dir / "plots", run_dir.name, op, refs)
        from cascadevlm.report.tensorboard import write_tensorboard

        md = summary_markdown(run_dir.name, payload, notes, sweep_rows)
        write_tensorboard(run_dir / "tensorboard", sweep_rows, metrics, md, run_dir.name, params, op, refs)
    files = ["records.parquet", "metrics.json", "summary.md"] + (
        ["stages.parquet"] if "cost" in payload else []
    )
    files += ["sweep.csv", "plots/", "tensorboard/"] if sweep_rows else []
    if opts.lvlm_on_val and backend is not None and val_path.exists():
        from cascadevlm.report.gates import write_gates_report

        try:
            write_gates_report(run_dir, topk=opts.topk)
            files.append("gates/")
        except (ValueError, RuntimeError) as err:  # the run's outputs are written; the report is extra
            log.warning(f"no gates report: {err}")
    print(paths["summary"].read_text())
    print(evaluate_closing_block(run_dir, files, methods))  # the last lines, as train.py fit ends
    return json.loads(paths["metrics"].read_text())


def evaluate(cli: LightningCLI) -> dict | None:
    """Run the evaluation described by a parsed CLI (:class:`cascadevlm.cli.EvaluateCLI`); returns metrics.json's content on rank 0."""
    run = prepare(cli)
    if not run.rank0:  # rank 0 holds the run directory's claim for all ranks
        return _evaluate(run)
    with claimed(run_claim_path(run.run_dir), lambda fh: _refuse_busy_run(run.run_dir)):
        return _evaluate(run)


def run_claim_path(run_dir: Path) -> Path:
    """The lock file a run holds while it writes ``run_dir``: in this user's temporary folder, named by the
    run directory's absolute path (nothing is added to the output folder, which holds only runs)."""
    key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"cascadevlm-claims-{os.getuid()}" / f"run-{key}.lock"


def _refuse_busy_run(run_dir: Path) -> None:
    raise ValueError(
        f"the run directory {run_dir} is being written by another evaluate.py run now (two runs of one name "
        "would delete each other's parts): wait for it to end, or set --run_name (or --output_dir) to another"
    )


def _evaluate(run: Run) -> dict | None:
    """The evaluation of a prepared run (on rank 0 under the run directory's claim)."""
    cli = run.cli
    if run.rank0:
        for n in run.notes:
            log.info(f"NOTE: {n}")
        hit = feature_cache_hit(cli.model, cli.datamodule, cli.config.cache_dir)
        log.info(f"image features: {'cached (image encoder skipped)' if hit else 'computing'}")
    if run.stages is not None:
        return evaluate_stages(run)
    clip_records, gate, sent = clip_and_gate(run)
    answers, calls = {}, {"total": 0, "this_attempt": 0}
    if run.backend is not None:
        answers, calls = lvlm_stage(run, clip_records, float(gate["tau"]), sent)
        check_failed_answers(answers, run.opts.max_failed_fraction)
        if run.opts.lvlm_on_val:
            calls["val"] = read_lvlm_calls(run.run_dir / "parts" / "val")
    if not run.rank0:
        return None
    return report(run, clip_records, answers, gate, calls)


# ----------------------------------------------------------------------------------------- costs
def two_stage_costs(run: Run, records: list[PredictionRecord], answers: dict) -> dict | None:
    """The two-stage cascade's costs: ``stages.parquet`` (and ``val_stages.parquet`` with validation
    answers) and metrics.json's ``cost`` block; records, metrics and the run name are untouched."""
    from cascadevlm.cascade.runner import read_clip_seconds
    from cascadevlm.cascade.stages import clip_column, cost_block, lvlm_column, write_stage_table

    opts, backend, run_dir = run.opts, run.backend, run.run_dir

    def columns(recs, answers, clip_parts):
        cols = [clip_column(recs, read_clip_seconds(clip_parts, len(recs)), opts.clip_price, opts.gate)]
        if backend is not None:
            name = Path(str(backend.answer_fingerprint().get("model") or "lvlm")).name
            cols.append(lvlm_column(name, recs, answers, "margin", opts.lvlm_price))
        return cols

    cols = columns(records, answers, run_dir / "parts")
    write_stage_table(run_dir / "stages.parquet", records, cols)
    val_path = run_dir / "val_records.parquet"
    if backend is not None and opts.lvlm_on_val and val_path.exists():
        val = read_records(val_path)
        val_answers = read_answers(run_dir / "parts" / "val")
        write_stage_table(
            run_dir / "val_stages.parquet", val, columns(val, val_answers, run_dir / "parts" / "budget")
        )
    last = np.asarray([1 if r.deferred else 0 for r in records], dtype=np.int64)
    return cost_block(cols, last, opts.cost_unit)


# ----------------------------------------------------------------------------------- several LVLMs
def _reaching(columns: list, thresholds: list, s: int, combination: tuple[int, ...]) -> np.ndarray:
    """Which images reach stage ``s`` of ``combination`` given its earlier stages' uncertainties and
    thresholds (none when the combination skips ``s``)."""
    from cascadevlm.cascade.stages import gate_uncertainty

    going = np.full(len(columns[0].pred), s in combination)
    for k in combination:
        if k >= s:
            break
        going &= gate_uncertainty(columns[k].uncertainty) > thresholds[k]
    return going


def ask_stages(
    run: Run,
    records: list[PredictionRecord],
    columns: list,
    thresholds: list[float] | None,
    parts_root: Path,
    dm: CascadeDataModule | None = None,
    combination: tuple[int, ...] | None = None,
    gates: dict | None = None,
) -> dict[str, dict]:
    """Every LVLM stage of ``cascade.stages`` in order, each on its own parts directory (stage 1:
    ``parts_root``, stage s: ``parts_root/stage<s>``) with its own fingerprint: about every image
    (``thresholds`` None or ``lvlm_on: all``) or those that reach it through the stages of
    ``combination`` (default: all; a stage it skips is asked nothing). ``gates``: the fitted learned
    gates by stage index (needed with ``thresholds`` for every stage whose gate is ``learned``). Appends
    each stage's column to ``columns``; returns the call counts by stage name."""
    from cascadevlm.cascade.lvlm_stage import _digest
    from cascadevlm.cascade.stages import lvlm_column, ranked_candidates

    calls: dict[str, dict] = {}
    digests: list[str] = []
    combination = tuple(range(len(run.stages) + 1)) if combination is None else tuple(combination)
    for st in run.stages:
        s = st.index
        if thresholds is None or run.opts.lvlm_on == "all":
            wanted = list(records)
        else:
            mask = _reaching(columns, thresholds, s, combination)
            wanted = [r for r, m in zip(records, mask, strict=True) if m]
        info = {"index": s, "candidates": st.candidates}
        if st.candidates == "previous":
            info["previous"] = digests[-1]
            prev = columns[s - 1].results
            missing = [r.index for r in wanted if r.index not in prev]
            if missing:
                raise RuntimeError(
                    f"stage {st.name!r} takes stage {s - 1}'s candidates, which has no answer for image {missing[0]}"
                )
            cands = {r.index: ranked_candidates(prev[r.index].candidate_ids, prev[r.index].scores
                                                or _choice_first(prev[r.index]), st.topk) for r in wanted}  # fmt: skip
        else:
            cands = {r.index: list(r.clip_topk[: st.topk]) for r in wanted}
        fp = stage_fingerprint(run, dm or run.cli.datamodule, st.backend, st.topk, info)
        digests.append(_digest(fp))
        parts = parts_root if s == 1 else parts_root / f"stage{s}"
        answers, c = lvlm_stage(run, records, -math.inf, dm=dm, parts=parts, stage=st, wanted=wanted,
                                candidates=cands, stage_info=info)  # fmt: skip
        for i, want in cands.items():
            a = answers.get(i)
            if a is not None and list(a.candidate_ids) != list(want):
                raise RuntimeError(
                    f"stored answer of stage {st.name!r} for image {i} was given other candidates"
                )
        check_failed_answers(answers, run.opts.max_failed_fraction, dm.split if dm is not None else "")
        learned = (gates or {}).get(s)
        if st.gate == "learned" and learned is None and thresholds is not None and st is not run.stages[-1]:
            raise RuntimeError(f"stage {st.name!r} has a learned gate but none was fitted")
        columns.append(lvlm_column(st.name, records, answers, st.gate, st.price, learned))
        calls[st.name] = c
    return calls


def _choice_first(answer) -> list[float]:
    """Stand-in scores of an answer without any (a failed or unparseable call): its choice first, then
    the candidates in their order."""
    n = len(answer.candidate_ids)
    pos = answer.candidate_ids.index(answer.lvlm_choice) if answer.lvlm_choice in answer.candidate_ids else 0
    return [1.0 if c == pos else -float(c + 1) for c in range(n)]


def _shared_clip_records(run: Run, dm: CascadeDataModule, parts: Path, title: str) -> list[PredictionRecord]:
    """The CLIP stage on ``dm``'s split; every rank gets the records (rank 0 writes them once)."""
    trainer, cfg = run.cli.trainer, run.cli.config
    with progress.stage(trainer, title):
        recs = run_clip_stage(trainer, run.cli.model, dm, parts, cfg.cache_dir)
    if run.rank0:
        write_records(parts / "clip_records.parquet", recs)
    trainer.strategy.barrier()
    return read_records(parts / "clip_records.parquet")


def choose_stage_thresholds(run: Run) -> dict:
    """``cascade.cost_budget``: CLIP, then every LVLM stage, on every ``budget_split`` image; the
    combination of stages and its thresholds chosen there from ``val_stages.parquet``
    (:func:`cascadevlm.gating.cost.choose_combination`: every combination whose stages have their
    candidates; one with ``candidates: previous`` needs the stage before it). A budget below CLIP
    alone's cost there is refused before any LVLM stage runs."""
    from cascadevlm.cascade.runner import read_clip_seconds
    from cascadevlm.cascade.stages import (
        chain_thresholds,
        clip_column,
        combinations,
        fit_learned_gates,
        stage_cost,
        stage_records,
        write_stage_table,
    )

    opts, run_dir = run.opts, run.run_dir
    val_dm = _with_split(run.cli.datamodule, opts.budget_split)
    parts = run_dir / "parts" / "budget"
    val = _shared_clip_records(run, val_dm, parts, f"CLIP stage: {val_dm.split} (for the cost budget)")
    columns = [clip_column(val, read_clip_seconds(parts, len(val)), opts.clip_price, opts.gate)]
    clip_cost = stage_cost(columns[0], opts.cost_unit)
    if not np.isfinite(clip_cost).all():
        raise ValueError(
            f"CLIP's {opts.cost_unit} cost is unknown on the {val_dm.split} split (seconds not kept with cached "
            "features, or no usable price): delete the feature cache entry or set --cascade.clip_price"
        )
    clip_1000 = float(clip_cost.mean()) * 1000
    if opts.cost_budget < clip_1000:
        raise ValueError(
            f"cascade.cost_budget {opts.cost_budget:g} {opts.cost_unit} per 1000 images is below CLIP alone's "
            f"cost on the {val_dm.split} split ({clip_1000:.4g}): raise --cascade.cost_budget"
        )
    ask_stages(run, val, columns, None, run_dir / "parts" / "val", dm=val_dm)

    def decide() -> dict:
        for col, st in zip(columns[1:], run.stages, strict=True):
            cost = stage_cost(col, opts.cost_unit)[col.pred >= 0]
            if not np.isfinite(cost).all():
                raise ValueError(
                    f"the {opts.cost_unit} cost of stage {st.index} {st.name!r} is unknown on "
                    f"{int((~np.isfinite(cost)).sum())} {val_dm.split} images: set {st.where}.price so that it "
                    "applies (a token rate needs a backend that reports tokens), or --cascade.cost_unit seconds"
                )
        from cascadevlm.gating.cost import choose_combination, read_cost_table

        start = [-math.inf] * len(run.stages)
        learned = fit_learned_gates(val, columns, run.stages)  # val columns: cross-fitted uncertainties
        write_stage_table(run_dir / "val_stages.parquet", val, columns)
        write_records(run_dir / "val_records.parquet", stage_records(val, columns, start))
        table = read_cost_table(
            run_dir / "val_stages.parquet", run_dir / "val_records.parquet", opts.cost_unit
        )
        previous = {st.index for st in run.stages if st.candidates == "previous"}
        allowed = [c for c in combinations(len(columns)) if all(s - 1 in c for s in previous & set(c))]
        choice = choose_combination(table, opts.cost_budget, allowed)
        combo = [int(s) for s in choice.stages]
        thresholds = chain_thresholds(combo, choice.thresholds, len(columns))
        write_records(run_dir / "val_records.parquet", stage_records(val, columns, thresholds, combo))
        gate = {
            "tau": thresholds[0],
            "thresholds": thresholds,
            "combination": [columns[s].name for s in combo],
            "combination_stages": combo,
            "source": f"cost_budget {opts.cost_budget:g} {opts.cost_unit} per 1000 images on {val_dm.split}",
            "budget_split_acc1": choice.acc,
            "budget_split_cost_per_1000": choice.cost_per_1000,
            "budget_split_calls": list(choice.calls),
            "search": {"exact": choice.exact, "points_searched": choice.points_searched,
                       "seconds": choice.seconds, "note": choice.note},
            "budget_split_combinations": {" > ".join(r["names"]): {k: r[k] for k in
                                          ("acc", "cost_per_1000", "calls", "thresholds", "exact")}
                                          for r in choice.per_combination},
            **({"learned_gates": learned} if learned else {}),
        }  # fmt: skip
        return gate

    return _decided_on_rank0(run, run_dir / "parts" / "stage_thresholds.json", decide)


def _decided_on_rank0(run: Run, path: Path, decide) -> dict:
    """``decide()`` on rank 0, its result shared with every rank through ``path`` (JSON). A one-line
    refusal there (a ValueError: an unknown cost, a gate that cannot be fitted) stops every rank with the
    same line, instead of leaving the others waiting at the barrier for a result that never comes."""
    if run.rank0:
        try:
            result = decide()
        except ValueError as err:
            atomic_write_text(path, json.dumps({"refused": str(err)}))
            run.cli.trainer.strategy.barrier()
            raise
        atomic_write_text(path, json.dumps(result, default=str))
    run.cli.trainer.strategy.barrier()
    out = json.loads(path.read_text())
    if "refused" in out:
        raise ValueError(out["refused"])
    return out


def _validation_stages(run: Run) -> tuple[list[PredictionRecord], list]:
    """CLIP and every LVLM stage on every ``budget_split`` image (``lvlm_on_val`` without a cost budget)."""
    from cascadevlm.cascade.runner import read_clip_seconds
    from cascadevlm.cascade.stages import clip_column

    opts, run_dir = run.opts, run.run_dir
    val_dm = _with_split(run.cli.datamodule, opts.budget_split)
    val = _shared_clip_records(run, val_dm, run_dir / "parts" / "budget", f"CLIP stage: {val_dm.split}")
    vseconds = read_clip_seconds(run_dir / "parts" / "budget", len(val))
    vcols = [clip_column(val, vseconds, opts.clip_price, opts.gate)]
    ask_stages(run, val, vcols, None, run_dir / "parts" / "val", dm=val_dm)
    return val, vcols


def evaluate_stages(run: Run) -> dict | None:
    """``cascade.stages``: CLIP, then each LVLM stage in order on the images that reach it (or on every
    image, ``lvlm_on: all``), each resumable on its own parts; rank 0 reports. A ``learned`` stage gate
    is fitted on the validation answers first (:func:`cascadevlm.cascade.stages.fit_learned_gates`)."""
    from cascadevlm.cascade.runner import read_clip_seconds
    from cascadevlm.cascade.stages import clip_column, fit_learned_gates, learned_gates

    opts, run_dir = run.opts, run.run_dir
    dm = run.cli.datamodule
    clip_records = _shared_clip_records(run, dm, run_dir / "parts", f"CLIP stage: {dm.split}")
    if opts.cost_budget is not None:
        gate = choose_stage_thresholds(run)
        thresholds = [None if t is None else float(t) for t in gate["thresholds"]]
        combination = tuple(int(s) for s in gate["combination_stages"])
    else:
        thresholds = [float(opts.tau), *(float(st.tau) for st in run.stages[:-1])]
        gate = {"tau": thresholds[0], "thresholds": thresholds, "source": "config"}
        combination = tuple(range(len(run.stages) + 1))
    validation = None
    if opts.lvlm_on_val and opts.cost_budget is None and any(st.gate == "learned" for st in run.stages):
        # a learned gate is fitted on the validation answers before it gates a test image (every rank
        # fits the same gates from the same part files; val_stages.parquet gets the cross-fitted values)
        validation = _validation_stages(run)
        gate["learned_gates"] = fit_learned_gates(*validation, run.stages)
    seconds = read_clip_seconds(run_dir / "parts", len(clip_records))
    columns = [clip_column(clip_records, seconds, opts.clip_price, opts.gate)]
    calls = ask_stages(run, clip_records, columns, thresholds, run_dir / "parts", combination=combination,
                       gates=learned_gates(gate.get("learned_gates")))  # fmt: skip
    if opts.lvlm_on_val and opts.cost_budget is None:  # answers on the validation split, for the report
        val, vcols = validation or _validation_stages(run)
        if run.rank0:
            from cascadevlm.cascade.stages import stage_records, write_stage_table

            write_stage_table(run_dir / "val_stages.parquet", val, vcols)
            write_records(run_dir / "val_records.parquet", stage_records(val, vcols, thresholds))
    if not run.rank0:
        return None
    return report_stages(run, clip_records, columns, thresholds, gate, calls, combination)


def report_stages(run: Run, clip_records: list, columns: list, thresholds: list, gate: dict,
                  calls: dict, combination: tuple[int, ...] | None = None) -> dict:  # fmt: skip
    """Records, stages.parquet, metrics.json (a method per combination of stages), summary.md and the
    Pareto report of a ``cascade.stages`` run; the cascade walks ``combination`` (default: every stage;
    a cost budget may choose fewer, docs/stages.md)."""
    from cascadevlm.cascade.stages import (
        combination_outcome,
        combinations,
        cost_block,
        reached_stages,
        stage_records,
        write_stage_table,
    )

    cfg, model, dm, trainer, opts = (
        run.cli.config,
        run.cli.model,
        run.cli.datamodule,
        run.cli.trainer,
        run.opts,
    )
    run_dir, notes, stages = run.run_dir, run.notes, run.stages
    hp = model.hparams
    num_classes = len(dm.class_names)
    combination = tuple(range(len(columns))) if combination is None else tuple(combination)
    records = stage_records(clip_records, columns, thresholds, combination)
    write_stage_table(run_dir / "stages.parquet", records, columns)
    metrics = classification_metrics(records, num_classes)
    labels = np.asarray([r.label for r in records], dtype=np.int64)
    names = [c.name for c in columns]
    methods: dict = {"clip": {"acc1": metrics.get("clip_acc1", float("nan")), "deferral": 0.0}}
    last = reached_stages(columns, thresholds, combination)
    methods["cascade"] = {"acc1": metrics.get("acc1", float("nan")), "deferral": float((last > 0).mean()),
                          "tau": thresholds[0], "thresholds": thresholds}  # fmt: skip
    combos = {}
    for comb in combinations(len(columns)):
        key = " > ".join(names[s] for s in comb)
        if any(thresholds[s] is None for s in comb[:-1]):
            continue  # it goes on from a stage the chosen combination skips: no threshold for it
        out = combination_outcome(columns, labels, comb, [thresholds[s] for s in comb[:-1]])
        if out is not None:
            combos[key] = {"acc1": out["acc"], "calls": out["calls"], "cost_per_image": out["cost_per_image"],
                           "thresholds": [thresholds[s] for s in comb[:-1]]}  # fmt: skip
    full = " > ".join(names[s] for s in combination)
    for key, c in combos.items():  # each combination at the run's thresholds (the whole one is "cascade")
        if key not in ("clip", full):
            methods[key] = {"acc1": c["acc1"], "deferral": c["calls"][1] / max(len(records), 1)}
    for s in range(1, len(columns)):
        out = combination_outcome(columns, labels, (0, s), [-math.inf])
        if out is not None:
            methods[f"{names[s]}_all"] = {"acc1": out["acc"], "deferral": 1.0}
            combos[f"{names[s]} on all"] = {"acc1": out["acc"], "calls": out["calls"],
                                            "cost_per_image": out["cost_per_image"]}  # fmt: skip
    ad = adapter_params(model)
    params = {
        "dataset": dm.name, "split": dm.split, "images": len(records), "classes": num_classes,
        "clip_model": hp.model_name, "clip_pretrained": hp.pretrained, "clip_precision": hp.precision,
        "adapter": hp.adapter, "adapter_method": ad["method"] if ad else None,
        "shots": ad["shots"] if ad and ad["shots"] is not None else dm.shots,
        "seed": ad["seed"] if ad and ad["seed"] is not None else dm.seed,
        "lvlm": " > ".join(st.name for st in stages), "stages": [st.name for st in stages],
        "combination": full,
        "tau": thresholds[0], "thresholds": thresholds, "gate": gate["source"], "lvlm_on": opts.lvlm_on,
        "topk": opts.topk, "incontext_shots": opts.incontext_shots, "gate_score": opts.gate,
        "lvlm_on_val": opts.lvlm_on_val, "cost_budget": opts.cost_budget, "cost_unit": opts.cost_unit,
        "selection_on_eval": selects_on_eval(opts, dm.split, True),
        "lvlm_calls": sum(c["total"] for c in calls.values()),
        "lvlm_calls_this_attempt": sum(c["this_attempt"] for c in calls.values()),
        "lvlm_calls_by_stage": {k: c["total"] for k, c in calls.items()},
        "lvlm_api_errors": sum(bool(needs_retry(r.fallback)) for r in records),
        "devices": trainer.world_size,
    }  # fmt: skip
    stage_rows = [{"stage": 0, "name": "clip", "price": opts.clip_price, "threshold": thresholds[0]}]
    for st in stages:
        fp = st.backend.answer_fingerprint()
        stage_rows.append({"stage": st.index, "name": st.name, "backend": fp.get("backend"), "model": fp.get("model"),
                           "mode": fp.get("mode"), "gate": st.gate, "candidates": st.candidates, "topk": st.topk,
                           "price": st.price, "in_combination": st.index in combination,
                           "threshold": thresholds[st.index] if st.index < len(thresholds) else None})  # fmt: skip
    payload = {
        "params": params,
        "metrics": metrics,
        "methods": methods,
        "gate": gate,
        "stages": stage_rows,
        "combinations": combos,
        "cost": cost_block(columns, last, opts.cost_unit, combination),
        "class_names": list(model.class_names or dm.class_names),
        "templates": list(model.templates),
        "config": _config_dict(cfg),
    }
    paths = write_run_outputs(run_dir, records, payload, notes, [])
    files = ["records.parquet", "stages.parquet", "metrics.json", "summary.md"]
    try:
        from cascadevlm.gating.cost import read_cost_table
        from cascadevlm.report.pareto import write_pareto_report

        table = read_cost_table(run_dir / "stages.parquet", run_dir / "records.parquet", opts.cost_unit)
        write_pareto_report(table, run_dir / "pareto", run_dir.name)
        files.append("pareto/")
    except (
        ImportError,
        ValueError,
        RuntimeError,
    ) as err:  # the run's outputs are written; the report is extra
        log.warning(f"no Pareto report: {err}")
    print(paths["summary"].read_text())
    print(evaluate_closing_block(run_dir, files, methods))
    return json.loads(paths["metrics"].read_text())


def _config_dict(cfg) -> dict:
    """The parsed config as plain data (for metrics.json); secrets never live in it (API keys come
    from environment variables read by the backend)."""
    d = cfg.as_dict() if hasattr(cfg, "as_dict") else dict(cfg)
    for key in ("config", "verbose", "quiet"):  # console flags change no result
        d.pop(key, None)
    cascade = d.get("cascade")
    if isinstance(cascade, dict):
        for key, default in COST_OPTION_DEFAULTS.items():
            if key in cascade and cascade[key] == default:
                cascade.pop(key)
    return json.loads(json.dumps(d, default=str))


__all__ = [
    "CascadeOptions",
    "check_options",
    "combine",
    "default_run_name",
    "evaluate",
]
