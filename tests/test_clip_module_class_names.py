"""ClipClassifier's class_names is typed Any (jsonargparse does not walk 10,000 names); a string, which a
list type refused, is refused in one line before the model is loaded, not split into one class per letter."""

from __future__ import annotations

import pytest

from cascadevlm.clip import module


def test_a_string_of_class_names_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(module, "load_clip", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(
        ValueError, match=r"^model.class_names must be a list of names, got the string 'cat'; "
    ):
        module.ClipClassifier(class_names="cat")
