"""10,000 classes through evaluate.py on the tiny CLIP: the head from its cache, records, routing, the LVLM.

The 10,000-class head is put in the cache by the test (a seeded random head under the real key):
encoding 80,000 prompts would take minutes on the test machine; that a cached head equals a fresh one
is pinned in tests/test_zero_shot_cache.py.
"""

import json

import datasets
import open_clip
import pytest
import torch
import torch.nn.functional as F

from cascadevlm.cli import evaluate_main, run_evaluate
from cascadevlm.clip.features import FeatureCache
from cascadevlm.clip.model import load_clip
from cascadevlm.clip.module import KEEP_LOGITS_MAX_CLASSES
from cascadevlm.clip.zero_shot import HEAD_DIR, HeadCache, head_key_parts
from cascadevlm.data.datamodule import CascadeDataModule
from cascadevlm.data.demo import fashion_mnist_dir
from cascadevlm.lvlm.parsing import parse_answer
from cascadevlm.records import read_records
from cascadevlm.testing.classes import relabelled_dataset, synthetic_class_names
from cascadevlm.zoo.tiny_clip import TINY_CLIP

N_CLASSES = 10_000
FAKE = "cascadevlm.testing.fake_lvlm.FakeLVLM"


@pytest.fixture(scope="module")
def many(tmp_path_factory, data_root, tiny_clip_path):
    """A 10,000-class dataset (24 Fashion-MNIST images per split) and a cache holding its head."""
    root = tmp_path_factory.mktemp("many")
    source = datasets.load_from_disk(str(fashion_mnist_dir(data_root)))
    source = datasets.DatasetDict({"test": source["test"], "val": source["val"]})
    names = synthetic_class_names(N_CLASSES)
    ds_dir = relabelled_dataset(source, names, root / "ds", rows=24)
    dm = CascadeDataModule(str(ds_dir))
    bundle = load_clip(TINY_CLIP, str(tiny_clip_path))
    head = F.normalize(
        torch.randn(N_CLASSES, bundle.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    HeadCache(root / "cache" / HEAD_DIR).save(head_key_parts(bundle, names, dm.templates), head)
    return {"root": root, "ds": ds_dir, "names": names, "head": head, "bundle": bundle}


def _args(many, tiny_clip_path, name, *extra):
    return [
        "--model.model_name", TINY_CLIP, "--model.pretrained", str(tiny_clip_path),
        "--data.dataset", str(many["ds"]), "--data.batch_size", "8",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--output_dir", str(many["root"] / "runs"), "--cache_dir", str(many["root"] / "cache"),
        "--run_name", name, *extra,
    ]  # fmt: skip


@pytest.fixture
def no_text_encoder(monkeypatch):
    calls = []
    real = open_clip.model.CLIP.encode_text
    monkeypatch.setattr(open_clip.model.CLIP, "encode_text", lambda *a, **k: calls.append(1) or real(*a, **k))
    yield
    assert calls == [], "the cached 10,000-class head was recomputed"


def test_ten_thousand_classes_clip_only(many, tiny_clip_path, no_text_encoder):
    out = run_evaluate(_args(many, tiny_clip_path, "clip"))
    assert out["params"]["classes"] == N_CLASSES
    records = read_records(many["root"] / "runs" / "clip" / "records.parquet")
    assert [r.index for r in records] == list(range(24))
    # reference: the cached image features against the head, scaled as CLIP does
    (feats_file,) = [p for p in (many["root"] / "cache").glob("*.safetensors")]
    feats = FeatureCache(feats_file.parent).load(feats_file.stem)
    logits = 100.0 * F.normalize(feats, dim=-1) @ many["head"].T
    ref_p, ref_ids = torch.softmax(logits.double(), -1).topk(5, -1)
    labels = datasets.load_from_disk(str(many["ds"]))["test"]["label"]
    for r in records:
        assert r.label == labels[r.index]
        assert r.clip_topk == ref_ids[r.index].tolist()
        assert r.clip_topk_probs == pytest.approx(ref_p[r.index].tolist(), abs=1e-5)
        assert r.clip_logits is None  # above KEEP_LOGITS_MAX_CLASSES: top-k only
    assert N_CLASSES > KEEP_LOGITS_MAX_CLASSES
    acc1 = sum(r.clip_pred == r.label for r in records) / 24
    assert out["metrics"]["clip_acc1"] == pytest.approx(acc1)
    assert (
        json.loads((many["root"] / "runs" / "clip" / "metrics.json").read_text())["class_names"]
        == many["names"]
    )


def test_ten_thousand_classes_routing_with_val_answers(
    many, tiny_clip_path, no_text_encoder, clean_fake_lvlm
):
    """Calibration, a conformal candidate set, a learned gate and fusion, fitted on validation records
    without full logits (top-k stored), at 10,000 classes."""
    out = run_evaluate(_args(
        many, tiny_clip_path, "routing", "--lvlm.class_path", FAKE, "--cascade.lvlm_on_val", "true",
        "--cascade.gate", "learned", "--cascade.calibration", "temperature", "--cascade.candidates", "aps",
        "--cascade.alpha", "0.2", "--cascade.fusion", "logprob", "--cascade.budget", "0.5", "--cascade.topk", "5",
    ))  # fmt: skip
    records = read_records(many["root"] / "runs" / "routing" / "records.parquet")
    assert len(records) == 24 and out["params"]["classes"] == N_CLASSES
    assert all(r.final is not None and 0 <= r.final < N_CLASSES for r in records)
    assert out["params"]["lvlm_calls_val"] == 24  # every validation image asked once


def test_ten_thousand_classes_with_the_lvlm_on_a_few_images(
    many, tiny_clip_path, tiny_llava_dir, no_text_encoder
):
    """The tiny LLaVA scores CLIP's top-5 by name (multi-token names, many sharing a genus)."""
    out = run_evaluate(_args(
        many, tiny_clip_path, "lvlm", "--data.limit", "3", "--cascade.tau=-inf", "--cascade.topk", "5",
        "--lvlm.class_path", "cascadevlm.lvlm.transformers_backend.TransformersBackend",
        "--lvlm.init_args.model", str(tiny_llava_dir), "--lvlm.init_args.device", "cpu",
        "--lvlm.init_args.prompt.options", "names", "--cascade.lvlm_batch_size", "3",
    ))  # fmt: skip
    records = read_records(many["root"] / "runs" / "lvlm" / "records.parquet")
    assert out["params"]["lvlm_calls"] == 3 and len(records) == 3
    for r in records:
        assert r.deferred and r.fallback is None
        assert r.lvlm_choice in r.clip_topk[:5] and r.final == r.lvlm_choice
        scores = torch.tensor(r.lvlm_scores)
        assert len(scores) == 5 and bool(torch.isfinite(scores).all())
        assert r.lvlm_choice == r.clip_topk[int(scores.argmax())]


def test_names_sharing_prefixes_parse_back_to_themselves():
    """Generation mode: every one of 10,000 names, answered among four neighbours sharing its genus (one
    of them a prefix of it or it of them), reads back as itself."""
    names = synthetic_class_names(N_CLASSES)
    base = 1500  # names i and i + 1500 are "Genus epithet" and "Genus epithet var1"
    for i in range(0, N_CLASSES, 7):
        j = i + base if i + base < N_CLASSES else i - base
        options = [names[i], names[j], names[(i // 30) * 30 + (i + 1) % 30], names[(i + 1) % N_CLASSES]]
        options = list(dict.fromkeys(options))
        assert parse_answer(names[i], options, "names") == 0, (names[i], options)
        assert parse_answer(f"The answer is {names[i]}.", options, "names") == 0, (names[i], options)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ("Parus major\n\nTurdus merula\n  \n", None),  # blank lines in a names file are skipped
        (["Parus major", " ", "Turdus merula"], "has empty class names (class ids [1])"),
        (["Parus major", "Turdus merula", "parus major"], "duplicate class names: ['parus major']"),
    ],
)
def test_bad_class_lists_refused_in_one_line_before_any_stage(
    many, tiny_clip_path, tmp_path, capsys, names, message
):
    if isinstance(names, str):
        path = tmp_path / "names.txt"
        path.write_text(names)
        names = str(path)
    else:
        names = json.dumps(names)
    with pytest.raises(SystemExit) as exit_:
        evaluate_main(_args(many, tiny_clip_path, "bad", "--data.class_names", names))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    if message is None:  # two names for a 10,000-class label feature
        assert "has 10000 classes in its label feature but 2 class names" in err[0]
    else:
        assert message in err[0]
    assert not (many["root"] / "runs" / "bad").exists()  # refused before any stage


def test_per_class_metrics_in_linear_memory_equal_torchmetrics():
    """Macro accuracy and mean per-class recall from per-class bincounts (no C x C confusion matrix)
    equal torchmetrics' own, with classes predicted but absent from the labels and classes never seen."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_recall

    from cascadevlm.report.metrics import accuracy, mean_per_class_recall

    g = torch.Generator().manual_seed(0)
    for n, c in ((50, 7), (300, 40), (9, 12)):
        labels = torch.randint(0, c // 2 + 1, (n,), generator=g)  # upper classes absent from the labels
        preds = torch.where(torch.rand(n, generator=g) < 0.5, labels, torch.randint(0, c, (n,), generator=g))
        ref_macro = float(multiclass_accuracy(preds, labels, c, average="macro"))
        assert accuracy(preds.tolist(), labels.tolist(), c, "macro") == pytest.approx(ref_macro, abs=1e-7)
        recall = multiclass_recall(preds, labels, c, average="none")
        present = torch.bincount(labels, minlength=c) > 0
        ref_recall = float(recall[present].mean())
        assert mean_per_class_recall(preds.tolist(), labels.tolist(), c) == pytest.approx(
            ref_recall, abs=1e-7
        )
    # 10,000 classes: the same numbers by hand
    labels, preds = [5, 5, 9_999, 42], [5, 7, 9_999, 3]
    assert accuracy(preds, labels, N_CLASSES, "macro") == pytest.approx(
        (0.5 + 1 + 0) / 5
    )  # 7 and 3: recall 0
    assert mean_per_class_recall(preds, labels, N_CLASSES) == pytest.approx((0.5 + 1 + 0) / 3)


def test_more_lettered_candidates_than_letters_refused_before_any_stage(
    many, tiny_clip_path, tiny_llava_dir, capsys
):
    llava = ["--lvlm.class_path", "cascadevlm.lvlm.transformers_backend.TransformersBackend",
             "--lvlm.init_args.model", str(tiny_llava_dir), "--lvlm.init_args.device", "cpu"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        evaluate_main(_args(many, tiny_clip_path, "letters", "--cascade.topk", "27", *llava))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: cascade.topk is 27 but lettered options stop at 26 (A-Z): set --cascade.topk <= 26, or name "
        "the options (--lvlm.init_args.prompt.options names)"
    ]
    assert not (many["root"] / "runs" / "letters").exists()  # refused before any stage


def test_class_label_copies_do_not_walk_the_names():
    """``datasets`` deep-copies a dataset's features on every ``features`` read, cast and select: a
    10,000-name ClassLabel is copied flat (a handful of deepcopy calls, not one per name and dict entry:
    ~30,000 before, 12 ms a copy), and the copy equals the original without sharing its containers."""
    import copy
    import cProfile
    import pstats

    import cascadevlm.data.loading  # noqa: F401  (installs the flat copy)

    names = synthetic_class_names(N_CLASSES)
    label = datasets.ClassLabel(names=names)
    features = datasets.Features({"label": label, "image": datasets.Image()})
    prof = cProfile.Profile()  # counts the recursive calls too (copy binds deepcopy as a default argument)
    dup = prof.runcall(copy.deepcopy, features)
    calls = sum(v[1] for k, v in pstats.Stats(prof).stats.items() if k[2] == "deepcopy")
    assert 0 < calls < 100
    assert dup == features and dup["label"].names == names
    assert dup["label"].str2int(names[1234]) == 1234 and dup["label"].int2str(9999) == names[9999]
    for attr in ("names", "_int2str", "_str2int"):
        assert getattr(dup["label"], attr) is not getattr(label, attr)
    dup["label"].names.append("extra")
    assert len(label.names) == N_CLASSES  # independent, as a deep copy is
    # names that are not plain strings (a subclass of str) are deep-copied the ordinary way
    odd = datasets.ClassLabel(names=["a", "b"])
    odd.names = [type("Name", (str,), {})("a"), "b"]
    assert copy.deepcopy(odd).names == ["a", "b"]


def test_evaluate_cli_does_not_walk_the_linked_class_names(many, tiny_clip_path, monkeypatch):
    """jsonargparse links data.class_names into the model on instantiation; typed as a list it adapted
    each of the 10,000 names (one deepcopy of its arguments per name: ~120 ms), now it passes the list on
    and ClipClassifier validates it once."""
    import jsonargparse._typehints as typehints

    from cascadevlm.cli import build_evaluate_cli

    calls = []
    real = typehints.adapt_typehints
    monkeypatch.setattr(typehints, "adapt_typehints", lambda *a, **k: calls.append(1) or real(*a, **k))
    cli = build_evaluate_cli(_args(many, tiny_clip_path, "cli"))
    assert cli.model.class_names == many["names"] == cli.datamodule.class_names
    assert 0 < len(calls) < 1000  # a few hundred (options and their parts), not one per class name
