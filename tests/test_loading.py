import io
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from cascadevlm.data.datamodule import CascadeDataModule
from cascadevlm.data.loading import ImageDecodeError, decode_image, load_dataset_dict
from cascadevlm.testing.images import sample_photos


def test_image_folder_of_real_photos(photo_folder):
    dsd = load_dataset_dict(str(photo_folder))
    assert set(dsd) == {"train", "test"}
    assert dsd["test"].features["label"].names == ["animal", "object", "person"]
    assert len(dsd["test"]) == 7
    dm = CascadeDataModule(str(photo_folder))
    assert dm.class_names == ["animal", "object", "person"]
    img = decode_image(dm.eval_dataset()[0]["image"], "test row 0")
    assert img.mode == "RGB"


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA"])
def test_modes_become_rgb(mode):
    src = sample_photos()["coffee"].resize((40, 30))
    img = src.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG" if mode != "CMYK" else "JPEG")
    out = decode_image({"bytes": buf.getvalue(), "path": None}, "row 3")
    assert out.mode == "RGB" and out.size == (40, 30)


def test_exif_orientation_is_applied():
    src = sample_photos()["coffee"].resize((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    src.save(buf, format="JPEG", exif=exif)
    assert decode_image({"bytes": buf.getvalue(), "path": None}, "x").size == (20, 40)


def test_truncated_and_corrupt_files_are_named(photo_folder, tmp_path):
    good = next((photo_folder / "test" / "animal").glob("*.jpg")).read_bytes()
    trunc = tmp_path / "cut.jpg"
    trunc.write_bytes(good[: len(good) // 3])
    with pytest.raises(ImageDecodeError, match=r"corrupt or truncated image: test row 5 \(.*cut.jpg\)"):
        decode_image({"bytes": None, "path": str(trunc)}, "test row 5")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ImageDecodeError, match=r"junk.jpg"):
        decode_image(str(junk), "test row 6")
    with pytest.raises(ImageDecodeError, match=r"image file missing: row 1 \(.*gone.jpg\)"):
        decode_image(str(tmp_path / "gone.jpg"), "row 1")


def test_unknown_dataset_and_split(photo_folder):
    with pytest.raises(
        ValueError, match=r"unknown dataset 'no-such-benchmark'.*Registered benchmarks.*fashion_mnist"
    ):
        load_dataset_dict("no-such-benchmark")
    with pytest.raises(FileNotFoundError, match="dataset directory '/nonexistent/dir' does not exist"):
        load_dataset_dict("/nonexistent/dir")
    with pytest.raises(ValueError, match=r"has no split 'val'; it has \['train', 'test'\]"):
        CascadeDataModule(str(photo_folder), split="val")
    with pytest.raises(KeyError, match="unknown dataset 'imagenet-zz'"):
        CascadeDataModule(str(photo_folder), benchmark="imagenet-zz")


def test_class_name_overrides_are_checked(photo_folder):
    with pytest.raises(ValueError, match="duplicate class names"):
        CascadeDataModule(str(photo_folder), class_names=["cat", "cat", "dog"])
    with pytest.raises(ValueError, match="has 3 classes in its label feature but 2 class names"):
        CascadeDataModule(str(photo_folder), class_names=["cat", "dog"])
    with pytest.raises(ValueError, match="k=3 is larger than the smallest class"):
        CascadeDataModule(str(photo_folder), split="test").kshot_split(3, 1)


# ------------------------------------------------------------------------------ class names by name
def _tiny_folder(root, classes, split="train"):
    from PIL import Image

    for i, cls in enumerate(classes):
        d = root / split / cls
        d.mkdir(parents=True)
        Image.new("RGB", (4, 4), (i % 256, 0, 0)).save(d / f"{i}.png")
    return root


def test_benchmark_folder_classes_get_their_names_by_name_not_position(tmp_path):
    from cascadevlm.data.benchmarks import PETS_CLASSES, PETS_RAW_NAMES
    from cascadevlm.data.loading import IMAGE_COLUMN

    # The official folder spellings; the image folder orders them its own way (case-sensitive sort).
    root = _tiny_folder(tmp_path / "oxford_pets", list(PETS_RAW_NAMES))
    dm = CascadeDataModule(str(root), split="train")
    ds = dm.eval_dataset()
    assert sorted(dm.class_names) == sorted(PETS_CLASSES) and dm.class_names != list(PETS_CLASSES)
    for row in ds:
        folder = Path(row[IMAGE_COLUMN]["path"]).parent.name
        assert dm.class_names[row["label"]] == PETS_CLASSES[PETS_RAW_NAMES.index(folder)], folder


def test_benchmark_folder_named_by_class_ids_is_refused(tmp_path):
    root = _tiny_folder(tmp_path / "flowers102", [str(i) for i in range(1, 103)])
    with pytest.raises(ValueError) as err:
        CascadeDataModule(str(root), split="train")
    assert str(err.value) == (
        f"dataset {str(root)!r} has class names that differ from benchmark 'flowers102''s (102 vs 102; "
        "102 not in the registry: ['1', '10', '100', '101', '102', ...]; 102 registry classes absent: "
        "['pink primrose', 'hard-leaved pocket orchid', 'canterbury bells', 'sweet pea', 'english marigold', "
        "...]); pass --data.class_names with its own names in label order, or --data.benchmark for the "
        "benchmark it is"
    )
    # The flag that fixes it: the folder's own names, in its label order.
    names = [f"flower {n}" for n in sorted(str(i) for i in range(1, 103))]
    assert CascadeDataModule(str(root), split="train", class_names=names).class_names == names


def test_a_flat_image_folder_evaluates_its_only_split_and_says_so(tmp_path, caplog):
    """``<root>/<class>/<image>`` has one split (``train``); it used to need --data.split train."""
    root = _tiny_folder(tmp_path / "flat", ["cat", "dog"], split="")
    with caplog.at_level(logging.INFO, logger="cascadevlm.data.datamodule"):
        dm = CascadeDataModule(str(root))
    assert (dm.split, dm.class_names, len(dm.eval_dataset())) == ("train", ["cat", "dog"], 2)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("cascadevlm")] == [
        f"dataset {str(root)!r} is an image folder without split folders: evaluating its only split, 'train' "
        "(--data.split)"
    ]
    # a folder whose only split folder is train/ still needs the flag: its test split is missing
    with pytest.raises(ValueError, match=r"has no split 'test'; it has \['train'\]: set --data.split"):
        CascadeDataModule(str(_tiny_folder(tmp_path / "split", ["cat", "dog"])))


def test_a_subset_of_a_benchmarks_classes_is_refused(tmp_path):
    root = _tiny_folder(tmp_path / "eurosat", ["Forest", "River", "Highway"])
    with pytest.raises(ValueError, match=r"\(3 vs 10; 7 registry classes absent: \['Annual Crop Land', "):
        CascadeDataModule(str(root), split="train")


# ------------------------------------------------------------------------------ options refused up front
@pytest.mark.parametrize("limit", [0, -3])
def test_limit_below_one_is_refused(photo_folder, limit):
    with pytest.raises(ValueError) as err:
        CascadeDataModule(str(photo_folder), limit=limit)
    assert (
        str(err.value) == f"data.limit must be >= 1 (or null for every image), got {limit}; set --data.limit"
    )


def test_labels_outside_the_class_count_are_refused(tmp_path):
    import datasets

    from cascadevlm.testing.images import sample_photos

    img = next(iter(sample_photos().values()))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    rows = {"image": [{"bytes": buf.getvalue(), "path": None}] * 3, "label": [0, 1, 3]}
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=feats)}).save_to_disk(
        str(tmp_path / "d")
    )
    with pytest.raises(ValueError) as err:
        CascadeDataModule(str(tmp_path / "d"), class_names=["a", "b", "c"])
    assert str(err.value) == (
        "dataset 'd' split 'test' has labels from 0 to 3 but 3 class names (ids 0..2; -1 marks an unknown "
        "label): give one name per label id with --data.class_names"
    )
    assert CascadeDataModule(str(tmp_path / "d"), class_names=["a", "b", "c", "d"]).labels() == [0, 1, 3]


def test_missing_splits_name_the_flag(photo_folder, data_root):
    from cascadevlm.clip.adapters import KShotFeatureDataModule

    with pytest.raises(ValueError) as err:
        CascadeDataModule(str(photo_folder), split="val")
    assert (
        str(err.value)
        == f"dataset {str(photo_folder)!r} has no split 'val'; it has ['train', 'test']: set --data.split"
    )
    with pytest.raises(ValueError) as err:
        CascadeDataModule(str(photo_folder), train_split="trainval").kshot_split(1, 1)
    assert str(err.value) == (
        f"dataset {str(photo_folder)!r} has no split 'trainval' to draw k-shot images from; it has "
        "['train', 'test']: set --data.train_split"
    )
    with pytest.raises(ValueError) as err:
        KShotFeatureDataModule(str(photo_folder), shots=1, cache_dir=None)
    assert str(err.value) == (
        f"dataset {str(photo_folder)!r} has no split 'val'; it has ['train', 'test']: set --data.val_split"
    )
    with pytest.raises(ValueError) as err:
        KShotFeatureDataModule(
            "fashion_mnist", shots=1, test_split="holdout", cache_dir=None, data_root=str(data_root)
        )
    assert str(err.value) == (
        "dataset 'fashion_mnist' has no split 'holdout'; it has ['train', 'val', 'test']: set --data.test_split "
        "(or null for none)"
    )
    with pytest.raises(
        ValueError, match=r"^data.val_limit must be >= 1 \(or null for every image\), got 0; set"
    ):
        KShotFeatureDataModule(str(photo_folder), shots=1, val_limit=0, cache_dir=None)


def test_skip_bad_leaves_undecodable_images_out_and_reports_them(photo_folder, tmp_path, capsys):
    import shutil

    from cascadevlm.data.loading import ImageDecodeError

    root = tmp_path / "photos"
    shutil.copytree(photo_folder, root)
    victim = sorted((root / "test" / "object").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated
    dm = CascadeDataModule(str(root))
    dm.transform = lambda img: torch.zeros(1)
    with pytest.raises(
        ImageDecodeError, match=r"; pass --data\.skip_bad true to leave undecodable images out$"
    ):
        list(dm.image_dataloader())
    full = dm.eval_dataset()
    bad_row = [i for i, v in enumerate(full["image"]) if v["path"] == str(victim)]
    skipping = CascadeDataModule(str(root), skip_bad=True)
    skipping.transform = lambda img: torch.zeros(1)
    ds = skipping.eval_dataset()
    assert len(ds) == len(full) - 1 and str(victim) not in [v["path"] for v in ds["image"]]
    assert skipping.skipped_rows == {"test": bad_row}
    assert (
        f"data.skip_bad: left out 1 undecodable image(s) of {len(full)} in split 'test' (rows {bad_row})"
        in (capsys.readouterr().err)
    )
    assert sum(len(b["label"]) for b in skipping.image_dataloader()) == len(full) - 1
