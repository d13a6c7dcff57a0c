"""`cascadevlm.data.prepare`: miniature official downloads of each benchmark -> HF datasets on disk."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import scipy.io

from cascadevlm.data.prepare import (
    BadImagesError,
    PrepareError,
    PrepareOptions,
    carve_val,
    main,
    prepare,
)
from cascadevlm.data.raw_formats import FORMATS, ReadOptions
from cascadevlm.data.registry import get_benchmark
from cascadevlm.testing.raw_trees import write_raw_tree

QUIET = {"log": lambda msg: None}

# The label names the default miniature test split must come out with, written out by hand from the
# official class lists (first class, second class, last class).
TEST_SPLIT_NAMES = {
    "stanford_cars": ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "smart fortwo Convertible 2012"],
    "fgvc_aircraft": ["707-320", "727-200", "Yak-42"],
    "flowers102": ["pink primrose", "hard-leaved pocket orchid", "blackberry lily"],
    "cub200": ["Black-footed Albatross", "Laysan Albatross", "Common Yellowthroat"],
    "oxford_pets": ["Abyssinian", "American Bulldog", "Yorkshire Terrier"],
    "food101": ["apple pie", "baby back ribs", "waffles"],
    "dtd": ["banded", "blotchy", "zigzagged"],
}
OFFICIAL_VAL = {"fgvc_aircraft", "flowers102", "dtd"}


def _rows(ds: datasets.Dataset) -> list[tuple[str, int]]:
    return list(zip(ds["path"], ds["label"], strict=True))


def _prepare(name: str, tmp_path: Path, **options):
    tree = write_raw_tree(name, tmp_path / "raw")
    card = prepare(name, tree.raw, tmp_path / "out", PrepareOptions(**options), **QUIET)
    return tree, datasets.load_from_disk(str(tmp_path / "out")), card


@pytest.mark.parametrize("name", sorted(TEST_SPLIT_NAMES))
def test_official_layout_prepares_with_official_splits(name, tmp_path):
    tree, dd, card = _prepare(name, tmp_path)
    spec = get_benchmark(name)

    assert list(dd) == ["train", "val", "test"]
    for split in dd:
        assert dd[split].features["label"].names == list(spec.class_names)
    assert _rows(dd["test"]) == tree.expected["test"]
    names = dd["test"].features["label"].names
    assert [names[i] for i in dd["test"]["label"]] == TEST_SPLIT_NAMES[name]
    if name in OFFICIAL_VAL:
        assert _rows(dd["train"]) == tree.expected["train"]
        assert _rows(dd["val"]) == tree.expected["val"]
    else:
        # val is carved from train: 20% of each class, at least one image -> one per class here.
        assert sorted(_rows(dd["train"]) + _rows(dd["val"])) == sorted(tree.expected["train"])
        assert sorted(Counter(dd["val"]["label"]).values()) == [1, 1, 1]
        assert len(dd["train"]) == 5 and len(dd["val"]) == 3
        assert "val: 20% of each class of train, seed 0" in card["split_source"]
    # Every image decodes as RGB, the grayscale sample photos included.
    images = [img for split in dd for img in dd[split]["image"]]
    assert {img.mode for img in images} == {"RGB"}
    assert card["splits"]["test"] == {
        "images": 3,
        "classes_present": 3,
        "images_per_class_min": 1,
        "images_per_class_max": 1,
    }
    on_disk = json.loads((tmp_path / "out" / "card.json").read_text())
    assert on_disk["splits"] == card["splits"] and on_disk["dataset"] == name
    assert on_disk["source"]["raw_dir"] == str(tree.raw.resolve())
    assert "| test | 3 | 3 | 1 | 1 |" in (tmp_path / "out" / "card.md").read_text()


def test_eurosat_gets_a_seeded_class_stratified_50_20_30_split(tmp_path):
    tree, dd, card = _prepare("eurosat", tmp_path)
    per_split = {s: Counter(dd[s]["label"]) for s in dd}
    # 10 images of classes 0 and 1, 5 of class 9 (round(2.5) == 2), 2 of each other class
    two = {c: 1 for c in range(2, 9)}  # round(1.0) == 1 train, round(0.4) == 0 val, 1 test
    assert per_split == {
        "train": {0: 5, 1: 5, 9: 2, **two},
        "val": {0: 2, 1: 2, 9: 1},
        "test": {0: 3, 1: 3, 9: 2, **two},
    }
    everything = _rows(dd["train"]) + _rows(dd["val"]) + _rows(dd["test"])
    assert sorted(everything) == sorted(tree.expected["all"])
    assert dd["train"].features["label"].names[9] == "Sea or Lake"
    assert card["split_source"] == "no official split: class-stratified 50/20/30 train/val/test, seed 0"

    read = FORMATS["eurosat"].read
    root, spec = tree.raw / "2750", get_benchmark("eurosat")
    first, again = read(root, spec, ReadOptions(seed=0)), read(root, spec, ReadOptions(seed=0))
    other = read(root, spec, ReadOptions(seed=1))
    assert first.splits == again.splits
    assert first.splits["test"] != other.splits["test"]


def test_eurosat_without_a_class_folder_is_refused(tmp_path):
    tree = write_raw_tree("eurosat", tmp_path / "raw")
    shutil.rmtree(tree.raw / "2750" / "Forest")  # used to be prepared as 10 classes, one never seen
    with pytest.raises(PrepareError) as err:
        prepare("eurosat", tree.raw, tmp_path / "out", **QUIET)
    assert str(err.value) == (
        f"{tree.raw / '2750'}: no folder for 1 of the 10 classes (Forest); the download is incomplete: "
        "extract EuroSAT.zip again"
    )
    assert not (tmp_path / "out").exists()


def test_dtd_fold_option_reads_that_folds_files(tmp_path):
    tree = write_raw_tree("dtd", tmp_path / "raw")
    prepare("dtd", tree.raw, tmp_path / "out", PrepareOptions(fold=2), **QUIET)
    dd = datasets.load_from_disk(str(tmp_path / "out"))
    # The miniature tree's fold 2 swaps train and test.
    assert _rows(dd["train"]) == tree.expected["test"]
    assert _rows(dd["test"]) == tree.expected["train"]


def test_two_workers_give_the_same_dataset_as_one(tmp_path):
    tree = write_raw_tree("food101", tmp_path / "raw")
    prepare("food101", tree.raw, tmp_path / "one", PrepareOptions(workers=1), **QUIET)
    prepare("food101", tree.raw, tmp_path / "two", PrepareOptions(workers=2), **QUIET)
    one, two = (datasets.load_from_disk(str(tmp_path / d)) for d in ("one", "two"))
    for split in one:
        a = one[split].cast_column("image", datasets.Image(decode=False))
        b = two[split].cast_column("image", datasets.Image(decode=False))
        assert a.to_list() == b.to_list()


def test_carve_val_is_stratified_seeded_and_keeps_order():
    items = [(Path(f"{c}_{i}.jpg"), c) for c in (0, 1, 2) for i in range(10)] + [(Path("lone.jpg"), 3)]
    train, val = carve_val(items, 0.2, seed=0)
    assert Counter(c for _, c in val) == {0: 2, 1: 2, 2: 2}  # the class with one image stays in train
    assert sorted(train + val) == sorted(items)
    assert train == [it for it in items if it not in val]
    assert val == [it for it in items if it in val]
    assert carve_val(items, 0.2, seed=0) == (train, val)
    assert carve_val(items, 0.2, seed=1)[1] != val


# --- CoOp-style split files ----------------------------------------------------------------------


def test_coop_split_file_is_honoured_exactly(tmp_path):
    tree = write_raw_tree("stanford_cars", tmp_path / "raw")
    # CoOp writes car names year first and numbers the classes its own way; paths are relative to the
    # dataset root. Move an official test image into train and reorder everything.
    split = {
        "train": [
            ["cars_test/00003.jpg", 7, "2012 smart fortwo Convertible"],
            ["cars_train/00004.jpg", 0, "2000 AM General Hummer SUV"],
        ],
        "val": [["cars_train/00007.jpg", 7, "2012 smart fortwo Convertible"]],
        "test": [
            ["cars_train/00005.jpg", 3, "2012 Acura RL Sedan"],
            ["cars_test/00001.jpg", 0, "2000 AM General Hummer SUV"],
        ],
    }
    split_path = tmp_path / "split_zhou_StanfordCars.json"
    split_path.write_text(json.dumps(split))
    card = prepare(
        "stanford_cars", tree.raw, tmp_path / "out", PrepareOptions(split_file=split_path), **QUIET
    )
    dd = datasets.load_from_disk(str(tmp_path / "out"))
    assert _rows(dd["train"]) == [("cars_test/00003.jpg", 195), ("cars_train/00004.jpg", 0)]
    assert _rows(dd["val"]) == [("cars_train/00007.jpg", 195)]
    assert _rows(dd["test"]) == [("cars_train/00005.jpg", 1), ("cars_test/00001.jpg", 0)]
    assert card["split_source"].startswith("split file split_zhou_StanfordCars.json (sha256 ")
    assert card["source"]["split_file"] == str(split_path.resolve())


def test_coop_split_file_for_eurosat_uses_coop_class_names(tmp_path):
    tree = write_raw_tree("eurosat", tmp_path / "raw")
    split = {
        "train": [
            ["SeaLake/SeaLake_2.jpg", 9, "Sea or Lake"],
            ["AnnualCrop/AnnualCrop_1.jpg", 0, "Annual Crop Land"],
        ],
        "val": [["Forest/Forest_10.jpg", 1, "Forest"]],
        "test": [["AnnualCrop/AnnualCrop_4.jpg", 0, "Annual Crop Land"]],
    }
    (tmp_path / "split.json").write_text(json.dumps(split))
    prepare(
        "eurosat", tree.raw, tmp_path / "out", PrepareOptions(split_file=tmp_path / "split.json"), **QUIET
    )
    dd = datasets.load_from_disk(str(tmp_path / "out"))
    assert _rows(dd["train"]) == [("2750/SeaLake/SeaLake_2.jpg", 9), ("2750/AnnualCrop/AnnualCrop_1.jpg", 0)]
    assert _rows(dd["val"]) == [("2750/Forest/Forest_10.jpg", 1)]
    assert _rows(dd["test"]) == [("2750/AnnualCrop/AnnualCrop_4.jpg", 0)]


def test_split_file_with_an_unknown_class_names_the_entry(tmp_path):
    tree = write_raw_tree("eurosat", tmp_path / "raw")
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": [["Forest/Forest_1.jpg", 1, "Glacier"]], "val": [], "test": []}))
    with pytest.raises(PrepareError) as err:
        prepare("eurosat", tree.raw, tmp_path / "out", PrepareOptions(split_file=path), **QUIET)
    assert str(err.value) == f"split file {path}, train[0]: class 'Glacier' is not a eurosat class"


def test_split_file_label_used_for_two_classes_is_an_error(tmp_path):
    tree = write_raw_tree("eurosat", tmp_path / "raw")
    path = tmp_path / "split.json"
    entries = [["Forest/Forest_1.jpg", 1, "Forest"], ["SeaLake/SeaLake_1.jpg", 1, "Sea or Lake"]]
    path.write_text(json.dumps({"train": entries, "val": [], "test": []}))
    with pytest.raises(PrepareError) as err:
        prepare("eurosat", tree.raw, tmp_path / "out", PrepareOptions(split_file=path), **QUIET)
    assert str(err.value) == f"split file {path}, train[1]: label 1 is 'Sea or Lake' here but 'Forest' before"


# --- bad input -----------------------------------------------------------------------------------


def test_missing_annotation_file_is_named(tmp_path):
    tree = write_raw_tree("fgvc_aircraft", tmp_path / "raw")
    missing = tree.raw / "fgvc-aircraft-2013b/data/images_variant_val.txt"
    missing.unlink()
    with pytest.raises(PrepareError) as err:
        prepare("fgvc_aircraft", tree.raw, tmp_path / "out", **QUIET)
    assert str(err.value) == f"missing annotation file {missing} (needed to prepare fgvc_aircraft)"
    assert not (tmp_path / "out").exists()


def test_missing_cars_test_labels_say_which_file_to_get(tmp_path):
    tree = write_raw_tree("stanford_cars", tmp_path / "raw")
    (tree.raw / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(PrepareError) as err:
        prepare("stanford_cars", tree.raw, tmp_path / "out", **QUIET)
    assert str(err.value) == (
        f"missing annotation file {tree.raw / 'cars_test_annos_withlabels.mat'} (needed to prepare "
        "stanford_cars; devkit/cars_test_annos.mat has no labels: get cars_test_annos_withlabels.mat)"
    )


def test_flowers_label_out_of_range_is_named(tmp_path):
    tree = write_raw_tree("flowers102", tmp_path / "raw")
    path = tree.raw / "imagelabels.mat"
    labels = scipy.io.loadmat(str(path))["labels"]
    labels[0, 4] = 103  # image 5
    scipy.io.savemat(str(path), {"labels": labels})
    with pytest.raises(PrepareError) as err:
        prepare("flowers102", tree.raw, tmp_path / "out", **QUIET)
    assert str(err.value) == f"{path}, image 5: label 103 is out of range 1..102"


def test_cars_class_out_of_range_is_named(tmp_path):
    tree = write_raw_tree("stanford_cars", tmp_path / "raw")
    path = tree.raw / "devkit/cars_train_annos.mat"
    annos = scipy.io.loadmat(str(path))["annotations"]
    annos[0, 1]["class"] = np.uint8(197)
    scipy.io.savemat(str(path), {"annotations": annos})
    with pytest.raises(PrepareError) as err:
        prepare("stanford_cars", tree.raw, tmp_path / "out", **QUIET)
    assert str(err.value) == f"{path}, annotation 2 (00002.jpg): class 197 is out of range 1..196"


def test_pets_class_id_out_of_range_is_named(tmp_path):
    tree = write_raw_tree("oxford_pets", tmp_path / "raw")
    path = tree.raw / "annotations/test.txt"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace(" 2 2 ", " 38 2 ")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PrepareError) as err:
        prepare("oxford_pets", tree.raw, tmp_path / "out", **QUIET)
    assert str(err.value) == f"{path}, line 2: class id 38 is out of range 1..37"


def test_cub_class_not_in_classes_txt_is_named(tmp_path):
    tree = write_raw_tree("cub200", tmp_path / "raw")
    path = tree.raw / "CUB_200_2011/image_class_labels.txt"
    path.write_text(path.read_text().replace("1 1\n", "1 201\n", 1))
    with pytest.raises(PrepareError) as err:
        prepare("cub200", tree.raw, tmp_path / "out", **QUIET)
    classes = tree.raw / "CUB_200_2011/classes.txt"
    assert str(err.value) == f"{path}, image 1: class 201 is out of range (not in {classes})"


def test_listed_but_absent_image_stops_with_the_list_or_is_skipped(tmp_path):
    tree = write_raw_tree("oxford_pets", tmp_path / "raw")
    gone = tree.raw / tree.expected["test"][1][0]
    gone.unlink()
    with pytest.raises(BadImagesError) as err:
        prepare("oxford_pets", tree.raw, tmp_path / "out", **QUIET)
    assert str(err.value) == (
        "1 of 11 listed images could not be read (10 good); fix or remove them, or pass --skip-bad to "
        f"leave them out:\n  {gone}: file not found"
    )
    assert err.value.bad == [(str(gone), "file not found")] and err.value.good == 10
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*")), "the temporary folder is cleaned up"

    messages = []
    card = prepare(
        "oxford_pets", tree.raw, tmp_path / "out", PrepareOptions(skip_bad=True), log=messages.append
    )
    dd = datasets.load_from_disk(str(tmp_path / "out"))
    assert len(dd["test"]) == 2 and tree.expected["test"][1][0] not in dd["test"]["path"]
    assert "skipped 1 unreadable image(s) of 11 (--skip-bad); 10 kept" in messages
    assert card["skipped_images"] == [{"path": str(gone), "reason": "file not found"}]


def test_truncated_jpeg_is_reported_by_path(tmp_path):
    tree = write_raw_tree("flowers102", tmp_path / "raw")
    broken = tree.raw / tree.expected["val"][0][0]
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImagesError) as err:
        prepare("flowers102", tree.raw, tmp_path / "out", PrepareOptions(workers=2), **QUIET)
    assert err.value.good == 8
    [(path, reason)] = err.value.bad
    assert path == str(broken)
    assert reason.startswith("truncated or corrupt image data (image file is truncated")
    assert f"\n  {broken}: truncated or corrupt image data" in str(err.value)


def test_raw_directory_of_another_dataset_is_recognised(tmp_path):
    tree = write_raw_tree("oxford_pets", tmp_path / "raw")
    with pytest.raises(PrepareError) as err:
        prepare("stanford_cars", tree.raw, tmp_path / "out", **QUIET)
    assert str(err.value) == (
        f"{tree.raw} does not look like the stanford_cars download: {tree.raw / 'devkit/cars_meta.mat'} not "
        "found (the dataset root may be any of '.', 'stanford_cars', 'stanford-cars', 'cars' inside it); "
        "it looks like the oxford_pets download instead"
    )


def test_class_list_of_another_dataset_is_rejected_by_name(tmp_path):
    tree = write_raw_tree("fgvc_aircraft", tmp_path / "raw")
    variants = tree.raw / "fgvc-aircraft-2013b/data/variants.txt"
    variants.write_text("707-320\nBoeing 787\n")
    with pytest.raises(PrepareError) as err:
        prepare("fgvc_aircraft", tree.raw, tmp_path / "out", **QUIET)
    assert str(err.value).startswith(f"{variants}, line 2: class 'Boeing 787' is not a fgvc_aircraft class")


def test_existing_output_needs_overwrite_and_unknown_names_are_listed(tmp_path):
    tree = write_raw_tree("dtd", tmp_path / "raw")
    prepare("dtd", tree.raw, tmp_path / "out", **QUIET)
    with pytest.raises(PrepareError) as err:
        prepare("dtd", tree.raw, tmp_path / "out", **QUIET)
    assert (
        str(err.value)
        == f"output {tmp_path / 'out'} already exists and is not empty; pass --overwrite to replace it"
    )
    prepare("dtd", tree.raw, tmp_path / "out", PrepareOptions(overwrite=True), **QUIET)
    assert len(datasets.load_from_disk(str(tmp_path / "out"))["test"]) == 3

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(PrepareError, match="refusing to overwrite .*notes: it is not a prepared dataset"):
        prepare("dtd", tree.raw, tmp_path / "notes", PrepareOptions(overwrite=True), **QUIET)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"

    with pytest.raises(PrepareError, match=r"unknown dataset 'imagenet'; known benchmarks: .*stanford_cars"):
        prepare("imagenet", tree.raw, tmp_path / "x", **QUIET)
    with pytest.raises(PrepareError, match="fashion_mnist has no raw-format reader"):
        prepare("fashion_mnist", tree.raw, tmp_path / "x", **QUIET)


# --- command line --------------------------------------------------------------------------------


def failed(argv: list[str]) -> int:
    """The exit status of ``prepare`` on ``argv``, which must stop (its error is one line on stderr)."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    return done.value.code


def test_cli_prepares_and_reports_errors_on_stderr(tmp_path, capsys):
    tree = write_raw_tree("cub200", tmp_path / "raw")
    out = tmp_path / "out"
    assert main(["cub200", "--raw", str(tree.raw), "--out", str(out), "--workers", "2", "--seed", "3"]) == 0
    err = capsys.readouterr().err
    assert "cub200: 11 images listed" in err
    assert f"wrote {out}: train 5, val 3, test 3 images, 200 classes" in err
    assert json.loads((out / "card.json").read_text())["options"]["seed"] == 3

    assert failed(["cub200", "--raw", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err == (
        f"error: raw directory {tmp_path / 'nowhere'} does not exist or is not a directory\n"
    )

    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert "fgvc_aircraft (100 classes): fgvc-aircraft-2013b/data/" in listed
    assert listed.count(" classes): ") == 8


def test_the_same_image_in_train_and_test_is_refused_naming_both_rows(tmp_path, capsys):
    tree = write_raw_tree("oxford_pets", tmp_path / "raw")
    test_rel = tree.expected["test"][0][0]
    train_rel = tree.expected["train"][1][0]  # a trainval image whose bytes become those of a test image
    (tree.raw / train_rel).write_bytes((tree.raw / test_rel).read_bytes())
    # With --allow-overlap the pair is kept and listed in the card, by prepared split and row.
    card = prepare("oxford_pets", tree.raw, tmp_path / "kept", PrepareOptions(allow_overlap=True), **QUIET)
    [pair] = card["images_in_two_splits"]
    assert (pair["path"], pair["other_split"], pair["other_row"], pair["other_path"]) == (
        train_rel,
        "test",
        0,
        test_rel,
    )
    assert datasets.load_from_disk(str(tmp_path / "kept"))[pair["split"]]["path"][pair["row"]] == train_rel
    with pytest.raises(PrepareError) as err:
        prepare("oxford_pets", tree.raw, tmp_path / "out", **QUIET)
    split, row = pair["split"], pair["row"]
    assert str(err.value) == (
        f"the same image is in {split} and test: {split} row {row} ({train_rel}) and test row 0 ({test_rel}) "
        "have identical bytes; remove the duplicates, or pass --allow-overlap to keep them"
    )
    assert not (tmp_path / "out").exists()
    assert failed(["oxford_pets", "--raw", str(tree.raw), "--out", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err.strip().endswith("pass --allow-overlap to keep them")
