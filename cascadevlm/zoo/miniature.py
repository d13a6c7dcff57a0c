"""The trained miniature of the paper: where its committed models live, and its claims read off records.

The models are made by :mod:`cascadevlm.zoo.pretrain` and loaded through the user's route (a CLIP
checkpoint path for ``--model.pretrained``, an LLaVA directory for the LVLM config's ``model``); this
module only names them and measures what the issue asks of them, from prediction records alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cascadevlm.records import PredictionRecord

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
CLIP_MODEL = "cascadevlm-tiny-vit"
CLIP_CHECKPOINT = CHECKPOINTS / "clip.safetensors"
LLAVA_DIR = CHECKPOINTS / "llava"
# The cheaper, weaker second LVLM (issue 24's cost cascade): the same training, a smaller network.
LLAVA_SMALL_DIR = CHECKPOINTS / "llava_small"
MANIFEST = CHECKPOINTS / "manifest.json"
# Never seen by the CLIP (images nor names); the LVLM saw every class.
LEFT_OUT = ("trouser", "sandal", "bag")
# The dataset's own spellings (the hub copy's ClassLabel names), by class id as in the registry.
OFFICIAL_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")  # fmt: skip


def spelling(names: Sequence[str], scheme: str) -> list[str]:
    """The class names as one naming scheme writes them: ``registry`` (as given), ``official``
    (:data:`OFFICIAL_NAMES`, for the ten Fashion-MNIST classes), ``upper`` (FULL UPPER CASE) or ``title``."""
    if scheme == "registry":
        return list(names)
    if scheme == "official":
        if len(names) != len(OFFICIAL_NAMES):  # they are the ten Fashion-MNIST classes' spellings only
            raise ValueError(
                f"the official spelling names Fashion-MNIST's 10 classes, not {len(names)} classes"
            )
        return list(OFFICIAL_NAMES)
    if scheme == "upper":
        return [n.upper() for n in names]
    if scheme == "title":
        return [n.title() for n in names]
    raise ValueError(f"unknown spelling scheme {scheme!r}; known: registry, official, upper, title")


def manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def _acc(pred: np.ndarray, label: np.ndarray, mask: np.ndarray) -> float:
    return float((pred[mask] == label[mask]).mean()) if mask.any() else float("nan")


def cascade_claims(records: Sequence[PredictionRecord], tau: float) -> dict:
    """The issue's numbers from one run's records (``lvlm_on: all`` or ``deferred``) and its gate's tau.

    The cascade is recomputed from what each record measured (label, CLIP's top-1, entropy, the LVLM's
    choice) and tau, never read from the stored ``final``/``deferred`` fields: ``clip``: CLIP alone;
    ``cascade``: the LVLM's choice where entropy > tau, CLIP's top-1 elsewhere; ``deferred_fraction``; on
    the deferred images, ``clip_on_deferred`` and ``lvlm_on_deferred``. ``stored_final_differs`` /
    ``stored_deferred_differs`` count the records whose stored fields disagree with that recomputation.
    """
    label = np.array([r.label for r in records])
    clip = np.array([r.clip_pred for r in records])
    deferred = np.array([r.entropy for r in records], dtype=np.float64) > tau
    lvlm = np.array([-1 if r.lvlm_choice is None else r.lvlm_choice for r in records])
    final = np.where(deferred, lvlm, clip)
    every = np.ones(len(records), dtype=bool)
    return {
        "images": len(records),
        "tau": float(tau),
        "clip": _acc(clip, label, every),
        "cascade": _acc(final, label, every),
        "deferred_fraction": float(deferred.mean()),
        "clip_on_deferred": _acc(clip, label, deferred),
        "lvlm_on_deferred": _acc(lvlm, label, deferred),
        "stored_final_differs": int(sum(r.final != f for r, f in zip(records, final, strict=True))),
        "stored_deferred_differs": int(sum(r.deferred != d for r, d in zip(records, deferred, strict=True))),
    }


def claim_failures(
    numbers: dict, lvlm_gain: float = 0.10, cascade_gain: float = 0.03, max_deferred: float = 0.30
) -> list[str]:
    """Which of the issue's claims the numbers break (empty: all hold). Gains are in accuracy units."""
    bad = []
    for field in ("final", "deferred"):
        if numbers.get(f"stored_{field}_differs"):
            bad.append(
                f"the records' stored {field!r} differs from the cascade recomputed from entropy, tau and the "
                f"LVLM's choice on {numbers[f'stored_{field}_differs']} images"
            )
    if not numbers["lvlm_on_deferred"] >= numbers["clip_on_deferred"] + lvlm_gain:
        bad.append(
            f"LVLM {numbers['lvlm_on_deferred']:.3f} on deferred images is not {lvlm_gain:.2f} above "
            f"CLIP's {numbers['clip_on_deferred']:.3f}"
        )
    if not numbers["cascade"] >= numbers["clip"] + cascade_gain:
        bad.append(
            f"cascade {numbers['cascade']:.3f} is not {cascade_gain:.2f} above CLIP's {numbers['clip']:.3f}"
        )
    if not numbers["deferred_fraction"] <= max_deferred:
        bad.append(f"{numbers['deferred_fraction']:.3f} of images deferred, more than {max_deferred}")
    return bad


def group_accuracy(
    records: Sequence[PredictionRecord], class_ids: Sequence[int], field: str = "clip_pred"
) -> float:
    """Accuracy of ``field`` (``clip_pred``, ``final``, ...) on the images whose label is in ``class_ids``."""
    label = np.array([r.label for r in records])
    pred = np.array([getattr(r, field) for r in records])
    return _acc(pred, label, np.isin(label, list(class_ids)))


def kshot_group_table(settings_out: str | Path, class_ids: Sequence[int]) -> dict[int, dict]:
    """Per k, the CLIP stage's accuracy (adapter's top-1 at k > 0) on images of ``class_ids``, mean and
    sample std over seeds, from a settings sweep's evaluation records (``<out>/eval/*/records.parquet``)."""
    from cascadevlm.records import read_records
    from cascadevlm.report.kshot import mean_std

    by_k: dict[int, list[float]] = {}
    for run in sorted(Path(settings_out, "eval").glob("*/metrics.json")):
        shots = int(json.loads(run.read_text())["params"].get("shots") or 0)
        records = read_records(run.parent / "records.parquet")
        by_k.setdefault(shots, []).append(group_accuracy(records, class_ids))
    return {
        k: dict(zip(("mean", "std"), mean_std(v), strict=True), seeds=len(v)) for k, v in sorted(by_k.items())
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m cascadevlm.zoo.miniature RUN_DIR [SETTINGS_OUT...]``: the issue's numbers for a demo run
    (claims on its records) and, per settings sweep, the accuracy on the left-out classes against k."""
    import argparse

    from cascadevlm.data.registry import FASHION_MNIST
    from cascadevlm.records import read_records

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("run_dir")
    p.add_argument("settings", nargs="*")
    args = p.parse_args(argv)
    names = list(FASHION_MNIST.class_names)
    left = [names.index(n) for n in LEFT_OUT]
    seen = [c for c in range(len(names)) if c not in left]
    records = read_records(Path(args.run_dir) / "records.parquet")
    numbers = cascade_claims(
        records, float(json.loads((Path(args.run_dir) / "gate.json").read_text())["tau"])
    )
    numbers["clip_seen_classes"] = group_accuracy(records, seen)
    numbers["clip_left_out_classes"] = group_accuracy(records, left)
    print(json.dumps(numbers, indent=1))
    print("claims that do not hold:", claim_failures(numbers) or "none")
    for out in args.settings:
        print(f"{out}: CLIP-stage accuracy on the left-out classes {', '.join(LEFT_OUT)} (%), by k")
        for k, row in kshot_group_table(out, left).items():
            print(f"  k={k:>2}: {100 * row['mean']:.1f} ± {100 * row['std']:.1f} ({row['seeds']} seeds)")


if __name__ == "__main__":
    main()
