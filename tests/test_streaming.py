"""--data.streaming: evaluation straight from webdataset shards / an image folder, the same records as the
materialised dataset, each image evaluated exactly once over slots and DDP ranks, no cache unless asked."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import pytest

from cascadevlm.cli import run_evaluate as main
from cascadevlm.data.datamodule import CascadeDataModule
from cascadevlm.data.prepare import PrepareOptions, prepare_wds
from cascadevlm.data.streaming import _rows
from cascadevlm.records import read_records
from cascadevlm.testing.images import sample_photos

REPO = Path(__file__).resolve().parents[1]
FAKE = "cascadevlm.testing.fake_lvlm.FakeLVLM"
CLASSES = {"cat_face": "chelsea", "coffee-cup": "coffee", "space_rocket": "rocket"}
N_TRAIN, N_TEST = 3, 4  # 12 test images in shards of 5: shards of unequal length


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    """A CLIP_benchmark-style mirror: train/ and test/ tar shards of <key>.jpg + <key>.cls, classnames.txt."""
    root = tmp_path_factory.mktemp("mirror") / "wds_set"
    root.mkdir()
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {}.\nitap of a {}.\n")
    photos = sample_photos()
    for split, (start, n) in {"train": (0, N_TRAIN), "test": (N_TRAIN, N_TEST)}.items():
        samples = []
        for label, photo in enumerate(CLASSES.values()):
            img = photos[photo].convert("RGB")
            for i in range(start, start + n):  # distinct crops, stored byte for byte by prepare
                w, h = img.size
                buf = io.BytesIO()
                img.crop((i * 7, i * 5, w - i * 3, h - i * 4)).resize((40, 40)).save(buf, "JPEG", quality=90)
                samples.append((label, buf.getvalue()))
        (root / split).mkdir()
        for s, first in enumerate(range(0, len(samples), 5)):
            with tarfile.open(root / split / f"{s}.tar", "w") as tar:
                for k, (label, data) in enumerate(samples[first : first + 5]):
                    _add(tar, f"s{first + k:05d}.cls", str(label).encode())
                    _add(tar, f"s{first + k:05d}.jpg", data)
    return root


@pytest.fixture(scope="module")
def prepared(mirror, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "wds_set"  # same name as the mirror: same run names
    prepare_wds(None, mirror, out, PrepareOptions(val_fraction=1 / 3), log=lambda m: None)
    return out


def _args(tiny_clip_path, dataset, out: Path, *extra) -> list[str]:
    return [
        "--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(tiny_clip_path),
        "--data.dataset", str(dataset), "--data.batch_size", "5",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--output_dir", str(out / "runs"), "--cache_dir", str(out / "cache"), *extra,
    ]  # fmt: skip


def _only_run(out: Path) -> Path:
    (run,) = (out / "runs").iterdir()
    return run


def test_every_slot_reads_its_own_rows_and_together_every_row_once(mirror):
    stream = CascadeDataModule(str(mirror), streaming=True).eval_dataset()
    keys = [s["__key__"] for _, s in _rows(stream.select_columns(["__key__"]), 0, 1)]
    assert len(keys) == 3 * N_TEST
    for slots in (2, 3, 5):
        seen = [(row, s["__key__"]) for slot in range(slots) for row, s in _rows(stream, slot, slots)]
        assert sorted(row for row, _ in seen) == list(range(len(keys)))  # none missing, none twice
        assert all(keys[row] == key for row, key in seen)  # row = position in the whole stream


def test_streamed_mirror_gives_the_records_of_its_prepared_copy(
    tiny_clip_path, mirror, prepared, tmp_path, clean_fake_lvlm
):
    lvlm = ["--lvlm.class_path", FAKE, "--cascade.tau", "1.05", "--cascade.topk", "2"]
    main(_args(tiny_clip_path, prepared, tmp_path / "table", *lvlm))
    table_images = {r.key: r.image.tobytes() for r in clean_fake_lvlm.log}
    clean_fake_lvlm.log.clear()
    streamed = ["--data.streaming", "true", "--data.num_workers", "2"]  # slots: 2 workers, in both stages
    main(_args(tiny_clip_path, mirror, tmp_path / "stream", *lvlm, *streamed))
    stream_images = {r.key: r.image.tobytes() for r in clean_fake_lvlm.log}

    table, stream = _only_run(tmp_path / "table"), _only_run(tmp_path / "stream")
    assert table.name == stream.name  # streaming changes no result, so it is not in the run name
    a, b = read_records(table / "records.parquet"), read_records(stream / "records.parquet")
    assert [r.index for r in b] == list(range(3 * N_TEST))
    assert 0 < sum(r.deferred for r in b) < len(b)
    assert [(r.index, r.label, r.clip_topk, r.deferred, r.lvlm_choice, r.final) for r in a] == [
        (r.index, r.label, r.clip_topk, r.deferred, r.lvlm_choice, r.final) for r in b
    ]
    probs = [[p for r in recs for p in r.clip_topk_probs] for recs in (a, b)]
    assert probs[0] == pytest.approx(probs[1], abs=1e-6)
    assert stream_images == table_images and len(stream_images) == len(b)  # the LVLM saw the same images
    assert list((tmp_path / "table" / "cache").glob("*.safetensors"))
    # no feature cache unless asked (the LVLM answer store, answers.sqlite, may live in that folder)
    assert not list((tmp_path / "stream" / "cache").glob("*.safetensors"))


def test_streamed_folder_with_a_limit_and_the_cache_asked_for(tiny_clip_path, photo_folder, tmp_path):
    out = tmp_path / "stream"
    streamed = [*_args(tiny_clip_path, photo_folder, out, "--data.limit", "5"), "--data.streaming", "true"]
    main([*streamed, "--data.cache_features", "true"])
    assert len(list((out / "cache").glob("*.safetensors"))) == 1
    first = read_records(_only_run(out) / "records.parquet")
    assert [r.label for r in first] == CascadeDataModule(str(photo_folder)).labels()[:5]
    main([*streamed, "--data.cache_features", "true"])  # served from the cache: labels read from the stream
    again = read_records(_only_run(out) / "records.parquet")
    assert [(r.index, r.label, r.clip_topk) for r in again] == [
        (r.index, r.label, r.clip_topk) for r in first
    ]
    assert [r.entropy for r in again] == pytest.approx([r.entropy for r in first], abs=1e-5)


def test_options_a_stream_cannot_honour_are_refused_in_one_line(mirror, photo_folder):
    with pytest.raises(ValueError, match=r"^data.skip_bad .*--data.streaming false$"):
        CascadeDataModule(str(photo_folder), streaming=True, skip_bad=True)
    with pytest.raises(ValueError, match=r"^data.shots .*: set --data.shots 0, or --data.streaming false$"):
        CascadeDataModule(str(photo_folder), streaming=True, shots=2)
    with pytest.raises(ValueError, match=r"is a webdataset mirror: stream it with --data.streaming true"):
        CascadeDataModule(str(mirror))


def test_a_stream_label_outside_the_class_names_names_the_row(photo_folder):
    dm = CascadeDataModule(str(photo_folder), streaming=True, class_names=["animal", "object"])
    dm.transform = lambda img: 0
    with pytest.raises(ValueError, match=r"^split 'test' row 5 has label 2 but there are 2 class names"):
        list(dm.image_dataloader())


@pytest.mark.slow
def test_two_ddp_processes_stream_each_image_exactly_once(tiny_clip_path, mirror, prepared, tmp_path):
    main(_args(tiny_clip_path, prepared, tmp_path / "one", "--run_name", "r"))
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    two = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), *_args(tiny_clip_path, mirror, tmp_path / "two"),
         "--run_name", "r", "--data.streaming", "true", "--trainer.devices", "2", "--trainer.strategy", "ddp"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = read_records(tmp_path / "one" / "runs" / "r" / "records.parquet")
    r2 = read_records(tmp_path / "two" / "runs" / "r" / "records.parquet")
    assert [r.index for r in r2] == list(range(3 * N_TEST))
    assert [(r.label, r.clip_topk) for r in r1] == [(r.label, r.clip_topk) for r in r2]
    # each rank wrote its own rows: together all of them, none twice
    parts = [json.loads(line)["index"] for p in (tmp_path / "two" / "runs" / "r" / "parts").glob("clip.rank*.jsonl")
             for line in p.read_text().splitlines()]  # fmt: skip
    assert sorted(parts) == list(range(3 * N_TEST))
    assert (
        json.loads((tmp_path / "two" / "runs" / "r" / "metrics.json").read_text())["params"]["devices"] == 2
    )


def test_streamed_hub_style_dataset_from_save_to_disk_equals_the_table(tmp_path, photo_folder):
    table = CascadeDataModule(str(photo_folder))
    table.dsd.save_to_disk(str(tmp_path / "saved"))
    stream = CascadeDataModule(str(tmp_path / "saved"), streaming=True)
    assert isinstance(stream.eval_dataset(), datasets.IterableDataset)
    assert (
        stream.labels() == table.labels()
        and stream.class_names == CascadeDataModule(str(tmp_path / "saved")).class_names
    )
