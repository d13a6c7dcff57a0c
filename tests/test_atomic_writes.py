"""Two processes writing one output at once: each writer's temporary file is its own (records.atomic_path).

Every cache entry, split file, mark, adapter and demo checkpoint is written to a temporary file and
renamed onto its name. Two writers of one output (DDP ranks filling one feature cache, two runs, test
workers) once shared that temporary name: a fixed ``<name>.tmp``, or ``<name>.<pid>.tmp``, which repeats
between machines on one shared file system (each container's job is the same pid). The second writer
overwrote the first's temporary file and renamed it away, and the first died on its own rename
(FileNotFoundError). Replayed here in one process: the other writer writes and renames the whole output
between this writer's temporary file and its rename.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

SAME_PID = (4242, 4242)  # two machines: each container runs the job as the same process id
OTHER_PIDS = (101, 202)  # two processes of one machine


def _feature_cache(root):
    from cascadevlm.clip.features import FeatureCache

    feats = torch.arange(12.0).reshape(3, 4)
    write = lambda: FeatureCache(root).save("key", feats, meta={"rows": 3})  # noqa: E731
    return write, lambda: torch.equal(FeatureCache(root).load("key"), feats)


def _head_cache(root):
    from cascadevlm.clip.zero_shot import HeadCache

    parts, head = {"class_names": ["a", "b"], "model": "m"}, torch.eye(2, 4)
    return lambda: HeadCache(root).save(parts, head), lambda: torch.equal(HeadCache(root).load(parts), head)


def _augmented(root):
    from cascadevlm.clip.adapters.augment import AugmentedFeatureStore

    rows = {0: torch.ones(4), 5: torch.zeros(4)}
    store = AugmentedFeatureStore(root)
    return lambda: store.save("key", rows), lambda: sorted(store.load("key")) == [0, 5]


def _kshot(root):
    from cascadevlm.data.kshot import KShotSplit, kshot_split_path, load_or_create_kshot

    labels = [0, 1, 2] * 4
    write = lambda: load_or_create_kshot(root, labels, 2, 0, "toy", 3)  # noqa: E731
    return write, lambda: KShotSplit.load(kshot_split_path(root, "toy", 2, 0)) == write()


def _mark_file(root):
    from cascadevlm.provenance import read_provenance, write_provenance

    root.mkdir()
    path, info = root / "w.safetensors", {"kind": "random", "description": "replayed"}
    save_file({"w": torch.ones(2)}, str(path))
    return lambda: write_provenance(path, info), lambda: read_provenance(path) == info


def _mark_dir(root):
    from cascadevlm.provenance import read_provenance, write_provenance

    root.mkdir()
    info = {"kind": "trained-demo", "description": "replayed"}
    return lambda: write_provenance(root, info), lambda: read_provenance(root) == info


def _adapter(root):
    from cascadevlm.clip.adapters.base import read_adapter, save_adapter
    from cascadevlm.clip.adapters.linear_probe import LinearProbe

    head = torch.nn.functional.normalize(torch.ones(3, 8), dim=-1)
    path = root / "adapter.safetensors"
    common = dict(model_name="m", weights_id="w", class_names=["a", "b", "c"], logit_scale=100.0, embed_dim=8)
    write = lambda: save_adapter(path, LinearProbe(head, 100.0), **common)  # noqa: E731
    return write, lambda: read_adapter(path)[1]["kind"] == "linear_probe"


def _tiny_clip(root):
    from cascadevlm.provenance import read_provenance
    from cascadevlm.zoo.tiny_clip import TINY_CLIP, build_tiny_clip

    write = lambda: build_tiny_clip(root, TINY_CLIP, seed=0)  # noqa: E731
    return write, lambda: read_provenance(write())["kind"] == "random"


def _clip_checkpoint(root):
    from cascadevlm.clip.model import register_model_configs
    from cascadevlm.zoo.realsize import write_clip_checkpoint
    from cascadevlm.zoo.tiny_clip import TINY_CLIP

    register_model_configs()
    path = root / "clip.pt"
    write = lambda: write_clip_checkpoint(TINY_CLIP, path)  # noqa: E731
    return write, lambda: len(torch.load(path, weights_only=True)) > 0


CASES = {
    "feature-cache": (_feature_cache, SAME_PID),
    "zero-shot-head": (_head_cache, SAME_PID),
    "augmented-features": (_augmented, SAME_PID),
    "kshot-split": (_kshot, SAME_PID),
    "provenance-file": (_mark_file, SAME_PID),
    "provenance-dir": (_mark_dir, SAME_PID),
    "adapter": (_adapter, OTHER_PIDS),
    "tiny-clip": (_tiny_clip, OTHER_PIDS),
    "clip-checkpoint": (_clip_checkpoint, OTHER_PIDS),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_writers_of_one_output_at_once_both_finish_and_leave_one_whole_file(tmp_path, monkeypatch, case):
    make, pids = CASES[case]
    root = tmp_path / "out"
    write, whole = make(root)
    before = set(os.listdir(root)) if root.exists() else set()
    real_replace, pid, other = os.replace, [pids[0]], []

    def the_other_writes_first(src, dst):
        if not other:  # the other process: its whole write, between our temporary file and our rename
            other.append(case)
            pid[0] = pids[1]
            write()
            pid[0] = pids[0]
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "getpid", lambda: pid[0])
        m.setattr(os, "replace", the_other_writes_first)
        write()
    assert other == [case]  # the interleaving happened
    assert whole()
    left = sorted(set(os.listdir(root)) - before)
    assert not [name for name in left if name.endswith(".tmp")], left  # no temporary file left behind
    assert all(load_file(str(root / n)) for n in left if n.endswith(".safetensors"))  # each one loads


def test_a_report_reading_runs_while_a_training_rewrites_metrics_reads_whole_files(tmp_path, monkeypatch):
    # report.kshot over a root while a sweep trains there: the training rewrites metrics.json at each
    # better epoch. Replayed: the report reads the runs while the writer has the file open for writing
    # (a truncated metrics.json stopped the report with "not valid JSON").
    import pathlib

    from cascadevlm.clip.adapters.checkpoint import AdapterCheckpoint
    from cascadevlm.report.kshot import collect_runs

    callback, row = AdapterCheckpoint(), {"dataset": "toy", "method": "linear_probe", "shots": 1, "seed": 0}
    callback._run_dir = tmp_path / "runs" / "toy_linear_probe_k1_seed0"
    callback._run_dir.mkdir(parents=True)  # the trainer's log directory
    monkeypatch.setattr(callback, "describe", lambda trainer: dict(row))
    row["val_acc"] = 0.5
    callback.write_metrics(None)  # the first validated epoch
    real_open, seen = pathlib.Path.open, []

    def open_then_the_report_reads(self, mode="r", *args, **kwargs):
        fh = real_open(self, mode, *args, **kwargs)
        if "w" in mode and not seen:
            seen.append(collect_runs(tmp_path / "runs"))
        return fh

    row["val_acc"] = 0.75
    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "open", open_then_the_report_reads)
        callback.write_metrics(None)  # a better epoch
    assert [r["val_acc"] for r in seen[0]] == [0.5]  # the previous epoch's whole file
    assert [r["val_acc"] for r in collect_runs(tmp_path / "runs")] == [0.75]
