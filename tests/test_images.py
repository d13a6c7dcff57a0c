"""`cascadevlm.data.images`: every readable image becomes upright RGB; the rest fail naming the file."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cascadevlm.data.images import ImageLoadError, encode_rgb, load_rgb


def _save(img: Image.Image, path, fmt: str, **kw):
    img.save(path, format=fmt, **kw)
    return path


@pytest.mark.parametrize(
    ("mode", "value", "fmt", "expected"),
    [
        ("L", 200, "JPEG", None),  # JPEG is lossy: checked approximately below
        ("L", 77, "PNG", (77, 77, 77)),
        ("1", 1, "PNG", (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), "JPEG", None),
        ("CMYK", (0, 255, 255, 0), "TIFF", (255, 0, 0)),
        ("RGBA", (10, 20, 30, 255), "PNG", (10, 20, 30)),
        ("RGBA", (10, 20, 30, 0), "PNG", (255, 255, 255)),  # transparent -> white, not black
        ("LA", (50, 0), "PNG", (255, 255, 255)),
        ("I;16", 65535, "PNG", (255, 255, 255)),
        ("I;16", 257 * 40, "PNG", (40, 40, 40)),
    ],
)
def test_modes_become_rgb(tmp_path, mode, value, fmt, expected):
    path = _save(Image.new(mode, (6, 4), value), tmp_path / f"x.{fmt.lower()}", fmt)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (6, 4)
    pixel = img.getpixel((2, 2))
    if expected is None:
        reference = Image.new(mode, (1, 1), value).convert("RGB").getpixel((0, 0))
        assert np.abs(np.subtract(pixel, reference)).max() <= 3
    else:
        assert pixel == expected


def test_palette_images_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    assert load_rgb(_save(pal, tmp_path / "p.png", "PNG")).getpixel((0, 0)) == (200, 30, 40)
    pal.info["transparency"] = 1
    assert load_rgb(_save(pal, tmp_path / "pt.png", "PNG", transparency=1)).getpixel((0, 0)) == (
        255,
        255,
        255,
    )
    gif = _save(pal.convert("RGB").convert("P"), tmp_path / "g.gif", "GIF")
    assert load_rgb(gif).mode == "RGB"


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(img, tmp_path / "rot.jpg", "JPEG", exif=exif.tobytes(), quality=95)
    up = load_rgb(path)
    assert up.size == (20, 40)
    r, g, b = up.getpixel((10, 2))  # the left strip is now at the top
    assert b > 200 and r < 60

    data, fmt = encode_rgb(path)
    assert fmt == "JPEG" and data != path.read_bytes()
    stored = Image.open(io.BytesIO(data))
    assert stored.size == (20, 40) and stored.getexif().get(0x0112, 1) == 1


def test_plain_rgb_jpeg_is_kept_byte_for_byte_and_others_reencoded(tmp_path):
    jpg = _save(Image.new("RGB", (8, 8), (1, 2, 3)), tmp_path / "a.jpg", "JPEG")
    assert encode_rgb(jpg) == (jpg.read_bytes(), "JPEG")
    gray = _save(Image.new("L", (8, 8), 9), tmp_path / "g.jpg", "JPEG")
    data, fmt = encode_rgb(gray)
    assert fmt == "JPEG" and Image.open(io.BytesIO(data)).mode == "RGB"
    # A PNG named .jpg (the Pets download has some) is read by content and stored losslessly.
    png = _save(Image.new("RGBA", (8, 8), (5, 6, 7, 255)), tmp_path / "fake.jpg", "PNG")
    data, fmt = encode_rgb(png)
    stored = Image.open(io.BytesIO(data))
    assert fmt == "PNG" and stored.mode == "RGB" and stored.getpixel((0, 0)) == (5, 6, 7)


def test_missing_truncated_and_non_image_files_name_the_path(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError) as err:
        load_rgb(missing)
    assert str(err.value) == f"{missing}: file not found"
    assert isinstance(err.value, OSError) and err.value.path == str(missing)

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError) as err:
        load_rgb(truncated)
    assert str(err.value).startswith(f"{truncated}: truncated or corrupt image data (image file is truncated")
    with pytest.raises(ImageLoadError):
        encode_rgb(truncated)

    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    with pytest.raises(ImageLoadError) as err:
        load_rgb(text)
    assert str(err.value) == f"{text}: not a recognised image format"

    with pytest.raises(ImageLoadError) as err:
        load_rgb(tmp_path)
    assert str(err.value) == f"{tmp_path}: is a directory, not an image file"
