"""Answer parsing and prompt building (cascadevlm/lvlm/parsing.py, cascadevlm/lvlm/prompts.py)."""

from __future__ import annotations

import pytest
from PIL import Image

from cascadevlm.lvlm.base import Exemplar, LVLMRequest
from cascadevlm.lvlm.parsing import normalize, parse_answer
from cascadevlm.lvlm.prompts import PromptConfig, build_prompt

OPTIONS = ["cat", "Boeing 737", "Boeing 737-800", "horse", "Airbus A320"]

# answer string, options style, expected display position (None = unparseable -> CLIP fallback)
TABLE = [
    # letters
    ("B", "letters", 1),
    ("b", "letters", 1),
    ("(C)", "letters", 2),
    ("C.", "letters", 2),
    ("D) horse", "letters", 3),
    ("**D**", "letters", 3),
    ("E. Airbus A320", "letters", 4),
    ("Answer: B", "letters", 1),
    ("The answer is option C.", "letters", 2),
    ("The correct answer is: (A)", "letters", 0),
    ("Letter E", "letters", 4),
    # as chat models write them: markdown, lower case
    ("**Answer:** B", "letters", 1),
    ("**Answer**: C", "letters", 2),
    ("The answer is b.", "letters", 1),
    ("answer: (d) horse", "letters", 3),
    ("The answer is a horse.", "letters", 3),  # "a" as an article, not option A
    ("Answer: e, the Airbus A320", "letters", 4),
    ("F", "letters", None),  # outside the 5 options shown
    ("answer is Z", "letters", None),
    # exact names, case and punctuation differences
    ("horse", "letters", 3),
    ("HORSE!", "names", 3),
    ("  Cat.  ", "names", 0),
    ("boeing 737 800", "names", 2),
    ("Boeing 737–800", "names", 2),  # en dash
    ("airbus a-320", "names", None),  # "a 320" is a different token sequence than "a320"
    ("Airbus A320", "names", 4),
    # a name inside a sentence; the longest matching candidate
    ("A cat", "letters", 0),  # "A" as an article, not option A
    ("The image shows a horse.", "names", 3),
    ("It is a Boeing 737-800 aircraft.", "names", 2),
    ("It's a Boeing 737.", "names", 1),
    ("boeing 737-800, not a boeing 737", "names", 2),
    ("I think this is an Airbus A320 on approach", "letters", 4),
    # ambiguous or unparseable
    ("a cat or a horse", "names", None),
    ("I do not know", "letters", None),
    ("", "letters", None),
    ("   ", "names", None),
    ("B", "names", None),  # letters only count when options were lettered
    ("category", "names", None),  # "cat" only as a whole word
]


@pytest.mark.parametrize("answer,style,expected", TABLE)
def test_parse_answer_table(answer, style, expected):
    assert parse_answer(answer, OPTIONS, style) == expected


def test_normalize_ignores_case_accents_and_punctuation():
    assert normalize("  Café—Crème, S.A. ") == "cafe creme s a"
    assert normalize("Boeing 737-800") == normalize("boeing   737 800")


def _req(n: int = 4, **kw) -> LVLMRequest:
    img = Image.new("RGB", (8, 8))
    return LVLMRequest(image=img, candidates=["cat", "horse", "rocket", "flower"][:n], **kw)


def test_lettered_prompt_keeps_clip_order_and_dataset_wording():
    p = build_prompt(_req(), PromptConfig(dataset="fgvc_aircraft"))
    text = p.messages[-1]["content"][1]["text"]
    assert text.startswith("Which of these aircraft variants is shown in the image?")
    assert "A. cat\nB. horse\nC. rocket\nD. flower" in text
    assert p.order == [0, 1, 2, 3] and p.answers == ["A", "B", "C", "D"]
    assert p.messages[-1]["content"][0] == {"type": "image"} and len(p.images) == 1


def test_named_options_and_templates_from_config():
    cfg = PromptConfig(
        options="names",
        question="Which {noun} is this?",
        noun="flower species",
        name_option="* {name}",
        name_instruction="Reply with the name only.",
        system="You are a botanist.",
    )
    p = build_prompt(_req(3), cfg)
    assert p.messages[0] == {"role": "system", "content": [{"type": "text", "text": "You are a botanist."}]}
    assert p.messages[-1]["content"][1]["text"] == (
        "Which flower species is this?\nOptions:\n* cat\n* horse\n* rocket\nReply with the name only."
    )
    assert p.answers == ["cat", "horse", "rocket"]


def test_shuffle_is_seeded_and_maps_back():
    cfg = PromptConfig(shuffle=True, shuffle_seed=0)
    orders = {tuple(build_prompt(_req(key=f"k{i}"), cfg).order) for i in range(20)}
    assert len(orders) > 1  # different images get different orders
    p = build_prompt(_req(key="k1"), cfg)
    assert p.order == build_prompt(_req(key="k1"), cfg).order  # reproducible
    assert sorted(p.order) == [0, 1, 2, 3]
    for d, c in enumerate(p.order):
        assert p.options[d] == _req().candidates[c]
        assert p.candidate_of(d) == c and p.display_of(c) == d


def test_in_context_examples_are_earlier_turns_with_a_cap():
    ex = [
        Exemplar(Image.new("RGB", (8, 8), (i, 0, 0)), name)
        for i, name in enumerate(["rocket", "cat", "horse"])
    ]
    p = build_prompt(_req(examples=ex), PromptConfig(max_images=3))
    roles = [m["role"] for m in p.messages]
    assert roles == ["user", "assistant", "user", "assistant", "user"]  # 2 examples + query = 3 images
    assert [m["content"][0]["text"] for m in p.messages if m["role"] == "assistant"] == ["C", "A"]
    assert (
        len(p.images) == 3
        and p.images[0].getpixel((0, 0)) == (0, 0, 0)
        and p.images[1].getpixel((0, 0))[0] == 1
    )
