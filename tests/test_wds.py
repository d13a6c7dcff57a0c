"""`prepare --wds`: CLIP_benchmark-style webdataset mirrors built here in the mirror's exact layout."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import datasets
import pytest
from test_prepare import failed

from cascadevlm.cli import run_evaluate as evaluate_main
from cascadevlm.data.datamodule import CascadeDataModule
from cascadevlm.data.prepare import PrepareError, PrepareOptions, main, prepare_wds
from cascadevlm.data.registry import get_benchmark
from cascadevlm.records import read_records
from cascadevlm.testing.images import sample_photos

QUIET = {"log": lambda msg: None}
# Mirror class names in label order (alphabetical, so an image folder of the same images agrees on ids);
# underscores and hyphens as in folder-derived names.
CLASSES = {"cat_face": "chelsea", "coffee-cup": "coffee", "space_rocket": "rocket"}
TEMPLATES = ["a photo of a {}.", "itap of a {}."]
N_TRAIN, N_TEST = 6, 3


def _crops(photo, n: int, offset: int) -> list[bytes]:
    """n distinct RGB JPEG crops of one photo (stored byte for byte by prepare)."""
    photo = photo.convert("RGB")
    w, h = photo.size
    out = []
    for i in range(n):
        f = 0.5 + 0.05 * (i + offset)
        box = (int(w * (1 - f) / 2), int(h * (1 - f) / 3), int(w * (1 + f) / 2), int(h * (1 + 2 * f) / 3))
        buf = io.BytesIO()
        photo.crop(box).resize((48, 48)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def images() -> dict[str, dict[str, list[bytes]]]:
    """split -> class name -> JPEG bytes, in the order both layouts list them."""
    photos = sample_photos()
    out: dict[str, dict[str, list[bytes]]] = {"train": {}, "test": {}}
    for cls, photo in CLASSES.items():
        crops = _crops(photos[photo], N_TRAIN + N_TEST, 0)
        out["train"][cls], out["test"][cls] = crops[:N_TRAIN], crops[N_TRAIN:]
    return out


def write_mirror(root: Path, images, class_names=None, per_shard: int = 7) -> Path:
    """The mirror layout: <split>/<n>.tar shards of <key>.jpg + <key>.cls, classnames.txt, templates."""
    root.mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(class_names or CLASSES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    for split, by_class in images.items():
        samples = [(label, data) for label, cls in enumerate(CLASSES) for data in by_class[cls]]
        (root / split).mkdir()
        for s, start in enumerate(range(0, len(samples), per_shard)):
            with tarfile.open(root / split / f"{s}.tar", "w") as tar:
                for k, (label, data) in enumerate(samples[start : start + per_shard]):
                    key = f"s{start + k:07d}"
                    _add(tar, f"{key}.cls", str(label).encode())
                    _add(tar, f"{key}.jpg", data)
    return root


def write_folder(root: Path, dd: datasets.DatasetDict) -> Path:
    """The raw layout of the same prepared images: <split>/<class>/<row>.jpg, rows in the same order."""
    for split, ds in dd.items():
        names = ds.features["label"].names
        for row, (img, label) in enumerate(
            zip(ds.cast_column("image", datasets.Image(decode=False))["image"], ds["label"], strict=True)
        ):
            d = root / split / names[label]
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{row:05d}.jpg").write_bytes(img["bytes"])
    return root


def _stored(ds: datasets.Dataset) -> list[tuple[bytes, int]]:
    raw = ds.cast_column("image", datasets.Image(decode=False))
    return [(img["bytes"], label) for img, label in zip(raw["image"], raw["label"], strict=True)]


@pytest.fixture(scope="module")
def prepared(images, tmp_path_factory) -> tuple[Path, datasets.DatasetDict, dict]:
    tmp = tmp_path_factory.mktemp("wds")
    mirror = write_mirror(tmp / "wds_tiny", images)
    card = prepare_wds(None, mirror, tmp / "out", PrepareOptions(val_fraction=1 / 3, seed=3), **QUIET)
    return tmp / "out", datasets.load_from_disk(str(tmp / "out")), card


def test_mirror_prepares_with_its_splits_names_and_templates(prepared, images):
    out, dd, card = prepared
    assert list(dd) == ["train", "val", "test"]
    assert dd["test"].features["label"].names == list(CLASSES)
    # test: every shard sample, in shard order, stored byte for byte
    expected_test = [(data, label) for label, cls in enumerate(CLASSES) for data in images["test"][cls]]
    assert _stored(dd["test"]) == expected_test
    # train + val: the mirror's train, val a seeded stratified third of each class (2 of 6)
    train, val = _stored(dd["train"]), _stored(dd["val"])
    all_train = [(data, label) for label, cls in enumerate(CLASSES) for data in images["train"][cls]]
    assert sorted(train + val) == sorted(all_train)
    assert [label for _, label in val] == [0, 0, 1, 1, 2, 2]
    assert card["templates"] == TEMPLATES and card["source"]["webdataset"].endswith("wds_tiny")
    assert CascadeDataModule(str(out)).templates == TEMPLATES


def test_evaluation_and_kshot_equal_the_same_images_from_an_image_folder(prepared, tiny_clip_path, tmp_path):
    out, dd, _ = prepared
    folder = write_folder(tmp_path / out.name, dd)  # the same name: k-shot draws are keyed by it
    templates = ["--data.templates", json.dumps(TEMPLATES)]
    runs = {}
    for name, source in {"wds": out, "folder": folder}.items():
        args = [
            "--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(tiny_clip_path),
            "--data.dataset", str(source), "--data.batch_size", "8", *templates,
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--output_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache"), "--run_name", name,
        ]  # fmt: skip
        if name == "folder":  # prompts as the mirror's classnames.txt spells them, not made readable
            args += ["--data.readable_names", "false"]
        metrics = evaluate_main(args)["metrics"]
        records = read_records(tmp_path / "runs" / name / "records.parquet")
        runs[name] = (metrics, [(r.index, r.label, r.clip_topk) for r in records])
    assert len(runs["wds"][1]) == N_TEST * len(CLASSES)
    assert runs["wds"][1] == runs["folder"][1]
    assert runs["wds"][0]["acc1"] == pytest.approx(runs["folder"][0]["acc1"])

    a = CascadeDataModule(str(out), splits_dir=str(tmp_path / "a")).kshot_split(shots=2, seed=5)
    b = CascadeDataModule(str(folder), splits_dir=str(tmp_path / "b")).kshot_split(shots=2, seed=5)
    assert a.indices == b.indices
    assert sorted(dd["train"]["label"][i] for i in a.all_indices) == [0, 0, 1, 1, 2, 2]


def test_registry_names_are_checked_against_classnames_txt(images, tmp_path):
    spec = get_benchmark("dtd")
    names = list(spec.class_names)
    names[0] = names[0].upper()  # case only: the same class
    names[1] = names[1].replace(" ", "_")  # underscores only: the same class
    names[2], names[5] = "bumpy-ish", "cracked glass"  # really different
    mirror = write_mirror(tmp_path / "bad", images, class_names=names)
    with pytest.raises(PrepareError) as err:
        prepare_wds("dtd", mirror, tmp_path / "out", **QUIET)
    first, *table = str(err.value).splitlines()
    assert first == (
        "the mirror's classnames.txt does not match the registry's dtd classes (2 of 47 class names differ); "
        "prepare it without NAME to use the mirror's own names:"
    )
    assert table == [
        "  id | registry | classnames.txt",
        f"  2 | {spec.class_names[2]} | bumpy-ish",
        f"  5 | {spec.class_names[5]} | cracked glass",
    ]
    short = write_mirror(tmp_path / "short", images, class_names=list(spec.class_names)[:46])
    assert failed(["dtd", "--wds", str(short), "--out", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()

    names[2], names[5] = spec.class_names[2], spec.class_names[5]
    good = write_mirror(tmp_path / "good", images, class_names=names)
    card = prepare_wds("dtd", good, tmp_path / "out", **QUIET)
    assert datasets.load_from_disk(str(tmp_path / "out"))["test"].features["label"].names == list(
        spec.class_names
    )
    assert card["templates"] == list(spec.templates)
    card = prepare_wds("dtd", good, tmp_path / "out2", keep_templates=True, **QUIET)
    assert card["templates"] == TEMPLATES


def test_cli_and_bad_mirrors(images, tmp_path, capsys):
    mirror = write_mirror(tmp_path / "m", images)
    assert main(["--wds", str(mirror), "--out", str(tmp_path / "out"), "--seed", "3"]) == 0
    assert datasets.load_from_disk(str(tmp_path / "out"))["test"].num_rows == N_TEST * len(CLASSES)
    capsys.readouterr()
    (mirror / "classnames.txt").unlink()
    assert failed(["--wds", str(mirror), "--out", str(tmp_path / "o3")]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {mirror} is not a CLIP_benchmark webdataset mirror: classnames.txt not found\n"
    )
    assert failed(["dtd", "--raw", str(mirror), "--wds", str(mirror), "--out", str(tmp_path / "o4")]) == 2
    assert capsys.readouterr().err == "error: give either --raw or --wds, not both\n"


def test_python_m_prepare_prints_the_summary_and_one_line_errors(images, tmp_path, capsys, monkeypatch):
    """Run as ``python -m`` the module is ``__main__``: its summary used to go to a logger outside the
    project's console (nothing printed), and its errors exited 1."""
    import runpy
    import sys
    import warnings

    import huggingface_hub

    def run_as_main(*argv: str) -> int:
        monkeypatch.setattr(sys, "argv", ["prepare", *argv])
        with pytest.raises(SystemExit) as done, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already imported
            runpy.run_module("cascadevlm.data.prepare", run_name="__main__")
        return done.value.code

    monkeypatch.delenv("CASCADEVLM_DEBUG", raising=False)
    out = tmp_path / "out"
    assert run_as_main("--wds", str(write_mirror(tmp_path / "m", images)), "--out", str(out)) == 0
    assert f"wrote {out}: train 15, val 3, test 9 images, 3 classes" in capsys.readouterr().err

    def offline(**kwargs):  # the hub client's errors run over several lines
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert run_as_main("--wds", "clip-benchmark/wds_nope", "--out", str(tmp_path / "o2")) == 2
    assert capsys.readouterr().err == (
        "error: --wds clip-benchmark/wds_nope: could not download the hub dataset (OSError: We couldn't connect "
        "to 'https://huggingface.co'. Check your connection.)\n"
    )


def test_a_sample_with_a_class_index_outside_classnames_is_refused(images, tmp_path):
    mirror = write_mirror(tmp_path / "m", images, class_names=list(CLASSES)[:2])  # ids 0..1, shards use 2
    with pytest.raises(PrepareError, match=r"sample 's0000012' has cls 2, outside 0\.\.1 \(classnames.txt\)"):
        prepare_wds(None, mirror, tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()


def test_a_mirror_with_test_shards_only_gives_a_loadable_test_split(images, tmp_path):
    mirror = write_mirror(tmp_path / "m", {"test": images["test"]})
    card = prepare_wds(None, mirror, tmp_path / "out", **QUIET)
    dd = datasets.load_from_disk(str(tmp_path / "out"))  # empty train/val used to be written, unloadable
    assert list(dd) == ["test"] and len(dd["test"]) == N_TEST * len(CLASSES)
    assert card["splits"]["test"]["images"] == N_TEST * len(CLASSES)


def test_clip_benchmark_templates_with_c_are_accepted_everywhere(images, tmp_path, tiny_clip_bundle):
    """CLIP_benchmark writes "a photo of a {c}." (it formats with c=name): prepare --wds, the data module and
    the zero-shot head take it as "{}"; a template with no place for the name stops before any stage."""
    import torch

    from cascadevlm.clip.zero_shot import build_zero_shot_head

    mirror = write_mirror(tmp_path / "m", {"test": images["test"]})
    (mirror / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nitap of a {c}.\n")
    card = prepare_wds(None, mirror, tmp_path / "out", **QUIET)
    assert card["templates"] == TEMPLATES
    assert CascadeDataModule(str(tmp_path / "out")).templates == TEMPLATES
    given = CascadeDataModule(str(tmp_path / "out"), templates=["a photo of a {c}.", "a {} photo."])
    assert given.templates == ["a photo of a {}.", "a {} photo."]

    b, names = tiny_clip_bundle, list(CLASSES)
    ours = build_zero_shot_head(b.model, b.tokenizer, names, ["a photo of a {c}.", "itap of a {c}."])
    torch.testing.assert_close(ours, build_zero_shot_head(b.model, b.tokenizer, names, TEMPLATES))

    with pytest.raises(ValueError) as err:
        CascadeDataModule(str(tmp_path / "out"), templates=["a photo of a {c}.", "a photo of a {name}."])
    assert str(err.value) == (
        "prompt templates must contain '{}' or '{c}' where the class name goes, once; --data.templates has "
        "['a photo of a {name}.']"
    )
