"""Real photographs that ship inside installed packages (no internet needed)."""

from __future__ import annotations

from PIL import Image

# name -> (class label used in tests, loader)
_SKIMAGE = ["astronaut", "chelsea", "coffee", "rocket", "camera", "horse", "coins", "hubble_deep_field"]


def sample_photos() -> dict[str, Image.Image]:
    """Real photos from scikit-image, scikit-learn and matplotlib, as PIL images in their own modes.

    Grayscale ones (camera, coins, horse) stay mode "L", so loaders are exercised on them.
    """
    import matplotlib.cbook
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos: dict[str, Image.Image] = {}
    for name in _SKIMAGE:
        arr = getattr(skimage.data, name)()
        if arr.dtype == bool:
            arr = arr.astype("uint8") * 255
        photos[name] = Image.fromarray(arr)
    sk = load_sample_images()
    for fname, arr in zip(sk.filenames, sk.images, strict=True):
        photos[fname.rsplit("/", 1)[-1].split(".")[0]] = Image.fromarray(arr)  # china, flower
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        photos["grace_hopper"] = Image.open(fh).convert("RGB")
    return photos
