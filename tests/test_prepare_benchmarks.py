"""The fine-grained registry entries: full class lists, CLIP templates, and the official spellings."""

from __future__ import annotations

import pytest

from cascadevlm.data.raw_formats import FORMATS, ClassIndex, PrepareError
from cascadevlm.data.registry import benchmark_names, get_benchmark, validate_class_names

EXPECTED = {  # name: (classes, noun, (index, clean name) spot checks against the official lists)
    "stanford_cars": (
        196,
        "car model",
        [(0, "AM General Hummer SUV 2000"), (195, "smart fortwo Convertible 2012")],
    ),
    "fgvc_aircraft": (100, "aircraft variant", [(0, "707-320"), (72, "F-16A/B"), (99, "Yak-42")]),
    "flowers102": (
        102,
        "flower species",
        [(0, "pink primrose"), (76, "passion flower"), (101, "blackberry lily")],
    ),
    "cub200": (
        200,
        "bird species",
        [(0, "Black-footed Albatross"), (8, "Brewer's Blackbird"), (140, "Arctic Tern")],
    ),
    "oxford_pets": (
        37,
        "pet breed",
        [(0, "Abyssinian"), (2, "American Pit Bull Terrier"), (36, "Yorkshire Terrier")],
    ),
    "food101": (101, "food", [(0, "apple pie"), (16, "cheesecake"), (100, "waffles")]),
    "dtd": (47, "texture", [(0, "banded"), (30, "polka-dotted"), (46, "zigzagged")]),
    "eurosat": (10, "land use type", [(0, "Annual Crop Land"), (9, "Sea or Lake")]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_entry_has_full_clean_class_list_templates_and_layout(name):
    spec = get_benchmark(name)
    count, noun, spots = EXPECTED[name]
    assert spec.num_classes == count
    validate_class_names(spec.class_names, name)
    assert spec.noun == noun
    for i, clean in spots:
        assert spec.class_names[i] == clean
    assert all("_" not in c for c in spec.class_names)
    assert spec.templates and all(t.count("{}") == 1 for t in spec.templates)
    assert len(spec.extra.get("raw_names", spec.class_names)) == count
    assert spec.raw_layout and spec.source.count("http") >= 1
    assert name in FORMATS and name in benchmark_names()


def test_templates_are_the_clip_paper_ones():
    assert (
        get_benchmark("fgvc_aircraft").templates[0].format("A380") == "a photo of a A380, a type of aircraft."
    )
    assert get_benchmark("food101").templates == ("a photo of {}, a type of food.",)
    assert get_benchmark("eurosat").question == "Which of these land use types is shown in the image?"


@pytest.mark.parametrize(
    ("name", "spelling", "label"),
    [
        ("stanford_cars", "2012 Acura RL Sedan", 1),  # CoOp: year first
        ("cub200", "009.Brewer_Blackbird", 8),  # classes.txt
        ("cub200", "Brewer_Blackbird", 8),
        ("oxford_pets", "american_pit_bull_terrier", 2),  # image-name prefix
        ("food101", "cheese_plate", 17),
        ("eurosat", "SeaLake", 9),  # folder name
        ("eurosat", "sea or lake", 9),
        ("fgvc_aircraft", "F/A-18", 73),
    ],
)
def test_official_and_coop_spellings_map_to_registry_labels(name, spelling, label):
    assert ClassIndex(get_benchmark(name)).lookup(spelling, "here") == label


def test_unknown_spelling_suggests_close_names():
    with pytest.raises(PrepareError) as err:
        ClassIndex(get_benchmark("dtd")).lookup("zigzag", "labels/train1.txt, line 3")
    assert (
        str(err.value)
        == "labels/train1.txt, line 3: class 'zigzag' is not a dtd class; closest: ['zigzagged']"
    )
