import io

import pytest
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
