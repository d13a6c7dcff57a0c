"""Plant the pipeline's worst one-line bugs, one at a time, in a copy of the repository, and check that
the suite catches each: ``python tools/planted_bugs.py [--only NAME ...] [--list]``.

Each :class:`PlantedBug` names a file, an exact snippet of the current code, its mutation and the tests
that must fail under it. The script copies the working tree (tracked and untracked, not ignored files)
to a temporary directory, runs the named tests there once unmodified (they must pass), then per bug
replaces the snippet, runs the tests with pytest and restores the file. It prints ``caught`` or
``MISSED`` per bug and exits 1 when any is missed (or a snippet no longer occurs exactly once, or the
unmodified tests fail). tests/test_planted_bugs.py checks, fast, that every snippet still occurs once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINE = "tests/test_evaluate_pipeline.py::"


@dataclass(frozen=True)
class PlantedBug:
    """One bug: ``original`` (exactly once in ``path``) becomes ``mutated``; ``tests`` must fail."""

    name: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]


BUGS: tuple[PlantedBug, ...] = (
    PlantedBug(
        "tau chosen on the evaluated images instead of the budget split",
        "cascadevlm/cascade/evaluate.py",
        "tau = tau_for_budget([r.entropy for r in val_records], opts.budget)",
        "tau = tau_for_budget([r.entropy for r in clip_records], opts.budget)",
        (PIPELINE + "test_budget_tau_is_chosen_on_the_budget_splits_own_records",),
    ),
    PlantedBug(
        "final answer taken from the LVLM on confident images too (lvlm_on: all)",
        "cascadevlm/cascade/evaluate.py",
        "r.final = r.lvlm_choice if d else r.clip_pred",
        "r.final = r.lvlm_choice if r.lvlm_choice is not None else r.clip_pred",
        (PIPELINE + "test_lvlm_on_all_final_is_clip_where_confident_and_the_lvlm_where_deferred",),
    ),
    PlantedBug(
        "inverted gate: the confident images sent",
        "cascadevlm/gating/gate.py",
        "return np.asarray(entropies, dtype=np.float64) > tau",
        "return np.asarray(entropies, dtype=np.float64) < tau",
        (PIPELINE + "test_lvlm_on_all_final_is_clip_where_confident_and_the_lvlm_where_deferred",),
    ),
    PlantedBug(
        "the LVLM shown the next row's image",
        "cascadevlm/cascade/lvlm_stage.py",
        'image = decode_image(self.dataset[rec.index][IMAGE_COLUMN], f"{self.split} row {rec.index}")',
        'image = decode_image(self.dataset[(rec.index + 1) % len(self.dataset)][IMAGE_COLUMN], f"{self.split} row {rec.index}")',
        (PIPELINE + "test_each_lvlm_answer_is_for_its_own_image_its_label_and_candidates_in_clips_order",),
    ),
    PlantedBug(
        "candidates shown in reversed order",
        "cascadevlm/cascade/lvlm_stage.py",
        'candidates=[class_names[c] for c in b["candidate_ids"]],',
        'candidates=[class_names[c] for c in b["candidate_ids"][::-1]],',
        (PIPELINE + "test_each_lvlm_answer_is_for_its_own_image_its_label_and_candidates_in_clips_order",),
    ),
    PlantedBug(
        "candidates shuffled (shown by class id, not CLIP's order)",
        "cascadevlm/cascade/lvlm_stage.py",
        'candidates=[class_names[c] for c in b["candidate_ids"]],',
        'candidates=[class_names[c] for c in sorted(b["candidate_ids"])],',
        (PIPELINE + "test_each_lvlm_answer_is_for_its_own_image_its_label_and_candidates_in_clips_order",),
    ),
    PlantedBug(
        "CLIP's top-1 recorded as the LVLM's answer",
        "cascadevlm/cascade/evaluate.py",
        "r.lvlm_choice, r.lvlm_raw, r.lvlm_scores, r.fallback = a.lvlm_choice, a.raw, a.scores, a.fallback",
        "r.lvlm_choice, r.lvlm_raw, r.lvlm_scores, r.fallback = r.clip_pred, a.raw, a.scores, a.fallback",
        (PIPELINE + "test_each_lvlm_answer_is_for_its_own_image_its_label_and_candidates_in_clips_order",),
    ),
    PlantedBug(
        "off-by-one label: each record gets the next image's label",
        "cascadevlm/cascade/writer.py",
        'label=int(out["label"][i]),',
        'label=int(out["label"][(i + 1) % len(out["index"])]),',
        (
            PIPELINE + "test_each_lvlm_answer_is_for_its_own_image_its_label_and_candidates_in_clips_order",
            "tests/test_evaluate.py::test_records_equal_a_plain_loop",
        ),
    ),
    PlantedBug(
        "the claim checker trusts the stored final answers",
        "cascadevlm/zoo/miniature.py",
        "final = np.where(deferred, lvlm, clip)",
        "final = np.array([r.final for r in records])",
        (
            "tests/test_miniature.py::test_claims_are_recomputed_from_what_the_records_measured_not_from_final",
        ),
    ),
    PlantedBug(
        "split-conformal quantile one rank too high",
        "cascadevlm/gating/routing.py",
        "return float(np.sort(scores)[k - 1])",
        "return float(np.sort(scores)[min(k, n - 1)])",
        ("tests/test_evaluate_routing.py::test_conformal_quantile_is_the_kth_smallest_calibration_score",),
    ),
    PlantedBug(
        "the query shown as its own in-context example",
        "cascadevlm/cascade/evaluate.py",
        "queries_from_pool_split=dm.split == dm.train_split,",
        "queries_from_pool_split=False,",
        (PIPELINE + "test_a_query_is_never_its_own_in_context_example",),
    ),
    PlantedBug(
        "selection on the evaluated split accepted",
        "cascadevlm/cascade/evaluate.py",
        "if selects_on_eval(opts, dm.split, has_lvlm) and not opts.allow_selection_on_eval:",
        "if False:",
        (PIPELINE + "test_selection_on_the_evaluated_split_is_refused_unless_asked_and_then_marked",),
    ),
    PlantedBug(
        "a run whose LVLM calls all failed reported",
        "cascadevlm/cascade/evaluate.py",
        "    if not answers or not failed:\n        return\n",
        "    if True:  # planted\n        return\n",
        (PIPELINE + "test_a_run_whose_lvlm_calls_failed_stops_in_one_line_and_keeps_its_answers",),
    ),
    PlantedBug(
        "several stages: the first LVLM stage's answer as final, not the last stage reached",
        "cascadevlm/cascade/stages.py",
        "r.final = int(columns[s].pred[j]) if s > 0 else r.clip_pred",
        "r.final = int(columns[1].pred[j]) if s > 0 else r.clip_pred",
        ("tests/test_stages.py::test_three_stage_run_matches_a_walk_by_hand",),
    ),
    PlantedBug(
        "several stages: every stage gated on CLIP's uncertainty instead of its own",
        "cascadevlm/cascade/stages.py",
        "going &= gate_uncertainty(columns[a].uncertainty) > thresholds[a]",
        "going &= gate_uncertainty(columns[0].uncertainty) > thresholds[a]",
        ("tests/test_stages.py::test_three_stage_run_matches_a_walk_by_hand",),
    ),
    PlantedBug(
        "learned stage gate: validation scored in sample (no cross-fitting)",
        "cascadevlm/gating/stage_gate.py",
        "out[held] = StageGate.fit(x[train], y[train], l2).uncertainty(x[held])",
        "out[held] = StageGate.fit(x[usable], y[usable], l2).uncertainty(x[held])",
        ("tests/test_stage_learned_gate.py::test_a_validation_image_is_scored_by_a_gate_not_fitted_on_it",),
    ),
    PlantedBug(
        "learned stage gate: fitted on labels one image off",
        "cascadevlm/cascade/stages.py",
        "right = col.pred == labels",
        "right = col.pred == np.roll(labels, 1)",
        (
            "tests/test_stage_learned_gate.py::test_three_stages_with_a_learned_gate_under_a_cost_budget_and_resume",
            "tests/test_stage_learned_gate.py::test_a_learned_gate_with_fixed_thresholds_is_fitted_on_validation_first",
        ),
    ),
    PlantedBug(
        "learned stage gate: features of another image's answer",
        "cascadevlm/cascade/stages.py",
        "a = answers.get(r.index)\n        if a is None or not a.scores:",
        "a = answers.get(r.index + 1)\n        if a is None or not a.scores:",
        (
            "tests/test_stage_learned_gate.py::test_three_stages_with_a_learned_gate_under_a_cost_budget_and_resume",
            "tests/test_stage_learned_gate.py::test_a_learned_gate_with_fixed_thresholds_is_fitted_on_validation_first",
        ),
    ),
)


def snippet_counts(root: Path = REPO) -> dict[str, int]:
    """How often each bug's original snippet occurs in its file under ``root`` (each must be 1)."""
    return {b.name: (root / b.path).read_text().count(b.original) for b in BUGS}


def copy_tree(dst: Path) -> None:
    """The working tree's tracked and untracked (not ignored) files, as they are now, into ``dst``."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def run_tests(root: Path, tests: tuple[str, ...], timeout: int) -> tuple[bool, str]:
    """Run ``tests`` in ``root`` (its own ``cascadevlm`` first on the path); (passed, last lines)."""
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout}s"
    tail = [line for line in (p.stdout + p.stderr).strip().splitlines() if line.strip()][-1:]
    return p.returncode == 0, " ".join(tail)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="bugs whose name contains one of these words")
    ap.add_argument("--list", action="store_true", help="list the bugs and their tests, run nothing")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    args = ap.parse_args(argv)
    bugs = [b for b in BUGS if args.only is None or any(w in b.name for w in args.only)]
    if args.list:
        for b in bugs:
            print(f"{b.name}\n  {b.path}: {b.original!r} -> {b.mutated!r}\n  caught by: {', '.join(b.tests)}")
        return 0
    stale = [name for name, n in snippet_counts().items() if n != 1]
    if stale:
        print(f"snippets that no longer occur exactly once: {stale}")
        return 1
    with tempfile.TemporaryDirectory(prefix="planted_bugs_") as tmp:
        root = Path(tmp)
        copy_tree(root)
        probe = subprocess.run([sys.executable, "-c", "import cascadevlm; print(cascadevlm.__file__)"], cwd=root,
                               env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True, text=True)  # fmt: skip
        if not Path(probe.stdout.strip()).resolve().is_relative_to(root.resolve()):
            print(f"the copy's tests would import another cascadevlm: {probe.stdout.strip() or probe.stderr}")
            return 1
        tests = tuple(dict.fromkeys(t for b in bugs for t in b.tests))
        start = time.perf_counter()
        ok, tail = run_tests(root, tests, args.timeout)
        print(
            f"unmodified code: {'tests pass' if ok else 'TESTS FAIL'} ({time.perf_counter() - start:.0f} s; {tail})"
        )
        if not ok:
            return 1
        missed = []
        for b in bugs:
            path = root / b.path
            original = path.read_text()
            path.write_text(original.replace(b.original, b.mutated))
            start = time.perf_counter()
            try:
                passed, tail = run_tests(root, b.tests, args.timeout)
            finally:
                path.write_text(original)
            print(
                f"{'MISSED' if passed else 'caught'}: {b.name} ({time.perf_counter() - start:.0f} s; {tail})"
            )
            if passed:
                missed.append(b.name)
    print(
        f"{len(bugs) - len(missed)} of {len(bugs)} planted bugs caught"
        + (f"; missed: {missed}" if missed else "")
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
