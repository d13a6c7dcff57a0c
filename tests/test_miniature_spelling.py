"""cascadevlm.zoo.miniature.spelling: each scheme writes the names given, by class id; ``official`` holds
Fashion-MNIST's ten spellings and refuses another class count instead of answering with them."""

from __future__ import annotations

import pytest

from cascadevlm.data.registry import FASHION_MNIST
from cascadevlm.zoo.miniature import OFFICIAL_NAMES, spelling


def test_schemes_by_class_id():
    names = list(FASHION_MNIST.class_names)
    assert spelling(names, "registry") == names
    assert spelling(names, "upper") == [n.upper() for n in names]
    assert spelling(names, "title") == [n.title() for n in names]
    assert spelling(names, "official") == list(OFFICIAL_NAMES)
    assert [n.lower() for n in OFFICIAL_NAMES][1:] == [n.replace("-", " ") for n in names][1:]


def test_official_refuses_another_class_count():
    with pytest.raises(
        ValueError, match=r"^the official spelling names Fashion-MNIST's 10 classes, not 3 classes$"
    ):
        spelling(["a", "b", "c"], "official")
    with pytest.raises(ValueError, match=r"^unknown spelling scheme 'x'"):
        spelling(["a"], "x")
