"""evaluate.py end to end: records against a plain reference loop, the feature cache, DDP, config errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from cascadevlm.cli import run_evaluate as main
from cascadevlm.clip.zero_shot import build_zero_shot_head
from cascadevlm.data.datamodule import CascadeDataModule
from cascadevlm.data.loading import ImageClassificationDataset
from cascadevlm.records import read_records

REPO = Path(__file__).resolve().parents[1]


def _args(tiny_clip_path, data_root, out, *extra):
    return [
        "--model.model_name", "cascadevlm-tiny-vit",
        "--model.pretrained", str(tiny_clip_path),
        "--data.dataset", "fashion_mnist",
        "--data.data_root", str(data_root),
        "--data.limit", "150",
        "--data.batch_size", "32",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--output_dir", str(out / "runs"),
        "--cache_dir", str(out / "cache"),
        "--run_name", "r",
        *extra,
    ]  # fmt: skip


def test_records_equal_a_plain_loop(tiny_clip_path, tiny_clip_bundle, data_root, tmp_path):
    metrics = main(_args(tiny_clip_path, data_root, tmp_path))["metrics"]
    records = read_records(tmp_path / "runs" / "r" / "records.parquet")
    assert [r.index for r in records] == list(range(150))

    b = tiny_clip_bundle
    dm = CascadeDataModule("fashion_mnist", data_root=str(data_root), limit=150)
    head = build_zero_shot_head(b.model, b.tokenizer, dm.class_names, dm.templates)
    loader = torch.utils.data.DataLoader(
        ImageClassificationDataset(dm.eval_dataset(), b.preprocess, "test"), 50
    )
    with torch.no_grad():
        feats = torch.cat([b.model.encode_image(x["pixel_values"], normalize=True) for x in loader])
    probs = torch.softmax(100.0 * feats @ head.T, -1)
    ref_p, ref_ids = probs.topk(5, -1)
    labels = dm.labels()
    for r in records:
        assert r.label == labels[r.index]
        assert r.clip_topk == ref_ids[r.index].tolist()
        assert r.clip_topk_probs == pytest.approx(ref_p[r.index].tolist(), abs=1e-4)
        assert r.final == r.clip_pred == r.clip_topk[0]
    acc1 = float((probs.argmax(-1) == torch.tensor(labels)).float().mean())
    assert metrics["acc1"] == pytest.approx(acc1)
    saved = json.loads((tmp_path / "runs" / "r" / "metrics.json").read_text())
    assert saved["metrics"]["acc1"] == pytest.approx(acc1)
    assert "not meaningful" in (tmp_path / "runs" / "r" / "summary.md").read_text()


def test_feature_cache_skips_the_image_encoder_and_never_goes_stale(
    tiny_clip_path, data_root, tmp_path, monkeypatch
):
    main(_args(tiny_clip_path, data_root, tmp_path))
    first = read_records(tmp_path / "runs" / "r" / "records.parquet")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    calls = []
    real = open_clip.model.CLIP.encode_image
    monkeypatch.setattr(
        open_clip.model.CLIP, "encode_image", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    main(_args(tiny_clip_path, data_root, tmp_path))
    assert calls == []  # served from the cache
    assert read_records(tmp_path / "runs" / "r" / "records.parquet") == first

    # other weights -> another key -> the encoder runs again
    from cascadevlm.zoo.tiny_clip import build_tiny_clip

    other = build_tiny_clip(tmp_path / "other", seed=1)
    main(_args(other, data_root, tmp_path))
    assert calls, "a checkpoint with other weights must not be served cached features"
    # another subset of the data -> another key as well
    calls.clear()
    main(_args(tiny_clip_path, data_root, tmp_path, "--data.limit", "140"))
    assert calls
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3


def _run_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.slow
def test_two_ddp_processes_give_the_same_records_as_one(tiny_clip_path, data_root, tmp_path):
    # 101 images in batches of 16 over 2 ranks: the distributed sampler pads one duplicate.
    common = [
        "--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(tiny_clip_path),
        "--data.dataset", "fashion_mnist", "--data.data_root", str(data_root), "--data.limit", "101",
        "--data.batch_size", "16", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    one = _run_cli(
        *common, "--output_dir", str(tmp_path / "one"), "--cache_dir", str(tmp_path / "c1"), "--run_name", "r"
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run_cli(
        *common, "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--output_dir", str(tmp_path / "two"), "--cache_dir", str(tmp_path / "c2"), "--run_name", "r",
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = read_records(tmp_path / "one" / "r" / "records.parquet")
    r2 = read_records(tmp_path / "two" / "r" / "records.parquet")
    assert [r.index for r in r2] == list(range(101))
    assert len(r1) == len(r2) == 101
    for a, b in zip(r1, r2, strict=True):
        assert (a.index, a.label, a.clip_topk) == (b.index, b.label, b.clip_topk)
        assert a.clip_topk_probs == pytest.approx(b.clip_topk_probs, abs=1e-5)
    m2 = json.loads((tmp_path / "two" / "r" / "metrics.json").read_text())
    assert m2["params"]["devices"] == 2 and m2["metrics"]["n"] == 101
    # both ranks' features were merged into one full cache entry
    cached = list((tmp_path / "c2").glob("*.safetensors"))
    assert len(cached) == 1


@pytest.mark.slow
def test_config_and_input_errors_are_named(tiny_clip_path, data_root, tmp_path, photo_folder):
    bad_key = _run_cli("--config", str(REPO / "configs" / "demo.yaml"), "--model.modle_name", "x")
    assert bad_key.returncode != 0
    assert "modle_name" in bad_key.stderr

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  model_name: cascadevlm-tiny-vit\n  temprature: 3\n")
    bad_yaml = _run_cli("--config", str(cfg))
    assert bad_yaml.returncode != 0 and "temprature" in bad_yaml.stderr

    unknown = _run_cli("--model.model_name", "ViT-Q-99", "--data.dataset", str(photo_folder))
    assert unknown.returncode != 0 and "unknown CLIP model 'ViT-Q-99'" in unknown.stderr

    # a corrupt image inside an image folder: the error names the file
    import shutil

    folder = tmp_path / "photos"
    shutil.copytree(photo_folder, folder)
    victim = next((folder / "test" / "object").glob("*.jpg"))
    victim.write_bytes(victim.read_bytes()[:200])
    broken = _run_cli(
        "--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(tiny_clip_path),
        "--data.dataset", str(folder), "--trainer.accelerator", "cpu",
        "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "c"),
    )  # fmt: skip
    assert broken.returncode != 0
    assert "corrupt or truncated image: test row" in broken.stderr and victim.name in broken.stderr


def test_image_folder_of_real_photos_end_to_end(tiny_clip_path, photo_folder, tmp_path):
    out = main([
        "--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(tiny_clip_path),
        "--data.dataset", str(photo_folder), "--data.batch_size", "4", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path / "c"),
    ])  # fmt: skip
    assert out["params"]["images"] == 7 and out["params"]["classes"] == 3
    records = read_records(next(tmp_path.glob("photos*/records.parquet")))
    assert sorted(r.label for r in records) == [0, 0, 1, 1, 1, 2, 2]  # animal, object, person
    assert all(len(r.clip_topk) == 3 for r in records)  # top-k capped at the 3 classes


def test_trainer_test_logs_the_same_metrics_as_the_records(tiny_clip_path, data_root):
    import lightning as L

    from cascadevlm.clip.module import ClipClassifier
    from cascadevlm.report.metrics import classification_metrics

    dm = CascadeDataModule("fashion_mnist", data_root=str(data_root), limit=120, batch_size=40)
    model = ClipClassifier(
        "cascadevlm-tiny-vit", str(tiny_clip_path), class_names=dm.class_names, templates=dm.templates
    )
    dm.transform = model.preprocess
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    logged = trainer.test(model, dataloaders=dm.image_dataloader(), verbose=False)[0]
    preds = [model.predict_step(b) for b in dm.image_dataloader()]
    from cascadevlm.cascade.writer import outputs_to_records

    records = [r for p in preds for r in outputs_to_records(p)]
    ref = classification_metrics(records, 10)
    assert logged["test/acc1"] == pytest.approx(ref["clip_acc1"], abs=1e-6)
    assert logged["test/acc5"] == pytest.approx(ref["clip_acc5"], abs=1e-6)
    assert logged["test/mean_per_class_recall"] == pytest.approx(ref["clip_mean_per_class_recall"], abs=1e-6)


def test_feature_part_files_never_unpickle_code(tmp_path, monkeypatch):
    """A DDP rank's feature part file holding a pickled object that would run code when loaded is refused,
    also where torch.load's default still unpickles anything (torch < 2.6, which pyproject.toml allows)."""
    import pickle

    from cascadevlm.cascade.writer import RecordPartsWriter

    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    writer = RecordPartsWriter(tmp_path / "parts")
    writer.parts_dir.mkdir()
    torch.save({"index": torch.arange(2), "features": Payload()}, writer.feature_path(1))
    real = torch.load
    monkeypatch.setattr(
        torch, "load", lambda f, *a, weights_only=False, **k: real(f, *a, weights_only=weights_only, **k)
    )
    with pytest.raises(pickle.UnpicklingError):
        writer.merged_features(world_size=2, num_rows=2)
    assert not marker.exists()
    # plain tensors still load
    torch.save({"index": torch.arange(2), "features": torch.ones(2, 3)}, writer.feature_path(1))
    assert torch.equal(writer.merged_features(world_size=2, num_rows=2), torch.ones(2, 3))
