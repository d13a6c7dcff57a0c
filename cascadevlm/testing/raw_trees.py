"""Miniature official downloads: real photos in each benchmark's raw layout, annotations in its formats.

Used by the preparation tests and ``bench/prepare.py``. :func:`write_raw_tree` returns what a correct
reader must find: per official split, the (path relative to the raw dir, registry label) pairs in the
order the official files list them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from cascadevlm.data.registry import get_benchmark
from cascadevlm.testing.images import sample_photos


@dataclass
class RawTree:
    raw: Path
    expected: dict[str, list[tuple[str, int]]]  # official split -> [(relative path, label)]


@lru_cache(maxsize=4)
def _thumbnails(size: int) -> tuple[Image.Image, ...]:
    out = []
    for _, img in sorted(sample_photos().items()):
        img = img.copy()
        img.thumbnail((size, size))
        out.append(img)
    return tuple(out)


def _photo(i: int, size: int, rng: np.random.Generator | None) -> Image.Image:
    img = _thumbnails(size)[i % len(_thumbnails(size))]
    if rng is not None:  # a random crop, so generated trees of thousands of images are not all alike
        w, h = img.size
        x, y = int(rng.integers(0, max(1, w // 4))), int(rng.integers(0, max(1, h // 4)))
        img = img.crop((x, y, x + 3 * w // 4, y + 3 * h // 4)).resize((w, h))
    return img


class _Writer:
    def __init__(self, raw: Path, size: int, vary: bool):
        self.raw, self.size, self.n = raw, size, 0
        self.rng = np.random.default_rng(0) if vary else None

    def image(self, path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        img = _photo(self.n, self.size, self.rng).copy()
        # The top row's first pixels spell the image's number in black and white: every file is distinct
        # (prepare refuses the same image in two splits), however few sample photos there are.
        for bit in range(16):
            on = (self.n >> bit) & 1
            img.putpixel((bit, 0), (255 * on,) * len(img.getbands()) if len(img.getbands()) > 1 else 255 * on)
        img.save(path, format="JPEG", quality=90)
        self.n += 1
        return path.relative_to(self.raw).as_posix()


DEFAULT_PLANS = {
    # split -> labels of its images, in listing order; first, second and last class of each dataset
    "with_val": {"train": [0, 0, 1, -1], "val": [0, 1], "test": [0, 1, -1]},
    "without_val": {"train": [0, 0, 0, 1, 1, 1, -1, -1], "test": [0, 1, -1]},
}


def _plan(name: str, plan: dict[str, list[int]] | None, has_val: bool) -> dict[str, list[int]]:
    k = get_benchmark(name).num_classes
    plan = plan or DEFAULT_PLANS["with_val" if has_val else "without_val"]
    return {s: [c % k for c in labels] for s, labels in plan.items()}


def _savemat(path: Path, variables: dict) -> None:
    import scipy.io

    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), variables)


def _cars_annotations(fnames: list[str], labels: list[int] | None) -> np.ndarray:
    fields = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O")]
    if labels is not None:
        fields.append(("class", "O"))
    fields.append(("fname", "O"))
    arr = np.zeros((1, len(fnames)), dtype=fields)
    for i, fname in enumerate(fnames):
        box = (np.uint16(1), np.uint16(2), np.uint16(40), np.uint16(30))
        arr[0, i] = (*box, np.uint8(labels[i] + 1), fname) if labels is not None else (*box, fname)
    return arr


def _cars(raw: Path, w: _Writer, plan) -> dict:
    spec = get_benchmark("stanford_cars")
    _savemat(raw / "devkit/cars_meta.mat", {"class_names": np.array(spec.class_names, dtype=object)[None, :]})
    expected = {}
    for split, folder, mat in (
        ("train", "cars_train", "devkit/cars_train_annos.mat"),
        ("test", "cars_test", "cars_test_annos_withlabels.mat"),
    ):
        fnames = [f"{i:05d}.jpg" for i in range(1, len(plan[split]) + 1)]
        expected[split] = [(w.image(raw / folder / f), c) for f, c in zip(fnames, plan[split], strict=True)]
        _savemat(raw / mat, {"annotations": _cars_annotations(fnames, plan[split])})
        if split == "test":  # the devkit's own test file, which has no labels
            _savemat(raw / "devkit/cars_test_annos.mat", {"annotations": _cars_annotations(fnames, None)})
    return expected


def _aircraft(raw: Path, w: _Writer, plan) -> dict:
    names = get_benchmark("fgvc_aircraft").class_names
    data = raw / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("".join(f"{n}\n" for n in names))
    expected, image_id = {}, 1000000
    for split, labels in plan.items():
        lines, expected[split] = [], []
        for c in labels:
            image_id += 7
            expected[split].append((w.image(data / "images" / f"{image_id:07d}.jpg"), c))
            lines.append(f"{image_id:07d} {names[c]}\n")
        (data / f"images_variant_{split}.txt").write_text("".join(lines))
    return expected


def _flowers(raw: Path, w: _Writer, plan) -> dict:
    # Official ids are 1..N over all images, and the splits interleave them; number them in reverse.
    entries = [(s, c) for s, labels in plan.items() for c in labels]
    ids = list(range(len(entries), 0, -1))
    labels = np.zeros(len(entries), dtype=np.uint8)
    expected: dict[str, list] = {s: [] for s in plan}
    setid: dict[str, list[int]] = {"trnid": [], "valid": [], "tstid": []}
    var = {"train": "trnid", "val": "valid", "test": "tstid"}
    for image_id, (split, c) in zip(ids, entries, strict=True):
        labels[image_id - 1] = c + 1
        setid[var[split]].append(image_id)
        expected[split].append((w.image(raw / "jpg" / f"image_{image_id:05d}.jpg"), c))
    _savemat(raw / "imagelabels.mat", {"labels": labels[None, :]})
    _savemat(raw / "setid.mat", {k: np.array(v, dtype=np.uint16)[None, :] for k, v in setid.items()})
    return expected


def _cub(raw: Path, w: _Writer, plan) -> dict:
    from cascadevlm.data.benchmarks import CUB_RAW_NAMES

    root = raw / "CUB_200_2011"
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(CUB_RAW_NAMES, 1)))
    # Official ids run class by class with train and test interleaved: list test images first here.
    entries = [(s, c) for s in ("test", "train") for c in plan[s]]
    expected: dict[str, list] = {"train": [], "test": []}
    images, labels, split_lines = [], [], []
    for image_id, (split, c) in enumerate(entries, 1):
        folder = CUB_RAW_NAMES[c]
        rel = f"{folder}/{folder.split('.', 1)[1].title()}_{image_id:04d}_{700 + image_id}.jpg"
        expected[split].append((w.image(root / "images" / rel), c))
        images.append(f"{image_id} {rel}\n")
        labels.append(f"{image_id} {c + 1}\n")
        split_lines.append(f"{image_id} {1 if split == 'train' else 0}\n")
    (root / "images.txt").write_text("".join(images))
    (root / "image_class_labels.txt").write_text("".join(labels))
    (root / "train_test_split.txt").write_text("".join(split_lines))
    return expected


def _pets(raw: Path, w: _Writer, plan) -> dict:
    from cascadevlm.data.benchmarks import PETS_RAW_NAMES

    (raw / "annotations").mkdir(parents=True)
    cats = [n for n in PETS_RAW_NAMES if n[0].isupper()]  # cat breeds are capitalised in the file names
    dogs = [n for n in PETS_RAW_NAMES if n[0].islower()]
    expected, counter, all_lines = {}, {}, []
    for split, fname in (("train", "trainval.txt"), ("test", "test.txt")):
        lines, expected[split] = [], []
        for c in plan[split]:
            breed = PETS_RAW_NAMES[c]
            counter[breed] = counter.get(breed, 100) + 1
            image = f"{breed}_{counter[breed]}"
            species, breed_id = (1, cats.index(breed) + 1) if breed in cats else (2, dogs.index(breed) + 1)
            lines.append(f"{image} {c + 1} {species} {breed_id}\n")
            expected[split].append((w.image(raw / "images" / f"{image}.jpg"), c))
        (raw / "annotations" / fname).write_text("".join(lines))
        all_lines += lines
    header = "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n#SPECIES: 1:Cat 2:Dog\n#BREED ID: 1-25:Cat 1:12:Dog\n"
    (raw / "annotations" / "list.txt").write_text(header + "".join(all_lines))
    return expected


def _food101(raw: Path, w: _Writer, plan) -> dict:
    from cascadevlm.data.benchmarks import FOOD_CLASSES, FOOD_RAW_NAMES

    root = raw / "food-101"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "classes.txt").write_text("".join(f"{n}\n" for n in FOOD_RAW_NAMES))
    (root / "meta" / "labels.txt").write_text("".join(f"{n.title()}\n" for n in FOOD_CLASSES))
    expected, image_id = {}, 100000
    for split in ("train", "test"):
        table: dict[str, list[str]] = {n: [] for n in FOOD_RAW_NAMES}
        for c in plan[split]:
            image_id += 13
            table[FOOD_RAW_NAMES[c]].append(f"{FOOD_RAW_NAMES[c]}/{image_id}")
        expected[split] = []
        for c, name in enumerate(FOOD_RAW_NAMES):  # prepare lists images class by class, like the JSON
            for entry in table[name]:
                expected[split].append((w.image(root / "images" / f"{entry}.jpg"), c))
        (root / "meta" / f"{split}.json").write_text(json.dumps(table))
        (root / "meta" / f"{split}.txt").write_text("".join(f"{e}\n" for v in table.values() for e in v))
    return expected


def _dtd(raw: Path, w: _Writer, plan) -> dict:
    names = get_benchmark("dtd").class_names
    root = raw / "dtd"
    (root / "labels").mkdir(parents=True)
    expected, counter = {}, {}
    for split, labels in plan.items():
        expected[split] = []
        for c in labels:
            counter[c] = counter.get(c, 0) + 1
            rel = f"{names[c]}/{names[c]}_{counter[c]:04d}.jpg"
            expected[split].append((w.image(root / "images" / rel), c))
    for fold, order in ((1, ("train", "val", "test")), (2, ("test", "val", "train"))):
        # Fold 2 swaps train and test, so the fold option has something to tell apart.
        for split, source in zip(("train", "val", "test"), order, strict=True):
            rels = [p.split("dtd/images/", 1)[1] for p, _ in expected[source]]
            (root / "labels" / f"{split}{fold}.txt").write_text("".join(f"{r}\n" for r in rels))
    return expected


def _eurosat(raw: Path, w: _Writer, plan) -> dict:
    from cascadevlm.data.benchmarks import EUROSAT_RAW_NAMES

    # plan: {"all": labels}; the split is the reader's (seeded), so the expectation has one list.
    expected: dict[str, list] = {"all": []}
    counter: dict[int, int] = {}
    for c in plan["all"]:
        counter[c] = counter.get(c, 0) + 1
        name = EUROSAT_RAW_NAMES[c]
        expected["all"].append((w.image(raw / "2750" / name / f"{name}_{counter[c]}.jpg"), c))
    return expected


_BUILDERS = {
    "stanford_cars": (_cars, False),
    "fgvc_aircraft": (_aircraft, True),
    "flowers102": (_flowers, True),
    "cub200": (_cub, False),
    "oxford_pets": (_pets, False),
    "food101": (_food101, False),
    "dtd": (_dtd, True),
    "eurosat": (_eurosat, None),
}
# every one of the ten class folders (a tree without one is refused), most of the images in three
EUROSAT_DEFAULT_PLAN = {"all": [0] * 10 + [1] * 10 + [9] * 5 + [c for c in range(2, 9) for _ in range(2)]}


def write_raw_tree(
    name: str, raw: str | Path, plan: dict[str, list[int]] | None = None, size: int = 48, vary: bool = False
) -> RawTree:
    """Write a miniature official download of ``name`` into ``raw``.

    ``plan`` maps each official split to the labels of its images (negative labels count from the
    end); the default uses the first, second and last class. ``vary`` crops each photo differently.
    """
    raw = Path(raw)
    raw.mkdir(parents=True, exist_ok=True)
    builder, has_val = _BUILDERS[name]
    if name == "eurosat":
        plan = _plan(name, plan or EUROSAT_DEFAULT_PLAN, True)
    else:
        plan = _plan(name, plan, has_val)
    return RawTree(raw, builder(raw, _Writer(raw, size, vary), plan))
