"""Answer parsing and prompt building (cascadevlm/lvlm/parsing.py, cascadevlm/lvlm/prompts.py)."""

from __future__ import annotations

import pytest
from PIL import Image

from cascadevlm.lvlm.base import Exemplar, LVLMRequest
from cascadevlm.lvlm.parsing import final_text, normalize, parse_answer
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


ECHO = "A. cat\nB. Boeing 737\nC. Boeing 737-800\nD. horse\nE. Airbus A320"

# What models write in generate mode when they answer in their own words or reason first (Qwen2.5-VL,
# LLaVA, InternVL, Gemma 3, GPT-4o, Qwen3-VL / DeepSeek-R1-style thinking), each with the option it
# picks among OPTIONS (A cat, B Boeing 737, C Boeing 737-800, D horse, E Airbus A320).
REASONING_TABLE = [
    # issue 20's cases: a final marker wins over an echoed option list; a capital article is no letter
    (ECHO + "\nAnswer: D", "letters", 3),
    ("A. cat\nD. horse\nAnswer: D", "letters", 3),
    ("Answer: A horse.", "letters", 3),
    ("A. No wait, D.", "letters", 3),
    ("答案是 B。", "letters", 1),
    ("答案：C", "letters", 2),
    ("（D）", "letters", 3),
    ("选项E", "letters", 4),
    ("Ｂ", "letters", 1),
    ("I'd say B", "letters", 1),
    ("Based on the image, I believe it's C.", "letters", 2),
    # <think> blocks: dropped; an unclosed one is reasoning cut short (no answer)
    ("<think>\nFour legs and a mane. A cat? No, far too big.\n</think>\n\nD", "letters", 3),
    ("<think>Option A is a cat, but the mane says horse.</think>Answer: D", "letters", 3),
    ("The fuselage is long and there are winglets.\n</think>\n\nThe answer is C.", "letters", 2),
    ("<think>It looks like a cat, so the answer is A. Hmm, but the tail", "letters", None),
    ("<think>Hmm.</think>\n<think>Still thinking.</think>\nFinal answer: E", "letters", 4),
    ("<THINK>the answer is A</THINK> Answer: B", "letters", 1),
    # reasoning, then the last explicit marker
    (
        "Let me look at the image. I can see a four-legged animal with a long mane and hooves. Among "
        "the options, only one fits.\n\nAnswer: D",
        "letters",
        3,
    ),
    (
        "Step 1: The image shows an aircraft.\nStep 2: Winglets and a stretched fuselage suggest the "
        "-800 variant.\nAnswer: C",
        "letters",
        2,
    ),
    ("**Reasoning:** A pointed nose and sharklets.\n\n**Answer:** E", "letters", 4),
    ("**Final Answer:** (B)", "letters", 1),
    ("The correct answer is **C. Boeing 737-800**.", "letters", 2),
    ("Answer:\n\nD. horse", "letters", 3),
    (
        "At first glance it could be A, since the fur looks soft, but hooves rule that out. The answer is D.",
        "letters",
        3,
    ),
    ("Answer: A\n\nOn reflection, the answer is D.", "letters", 3),
    ("The answer is B. No wait, C: the winglets.", "letters", 2),
    ("Answer: C. Actually, D.", "letters", 3),
    ("It could be A or D. I'll go with D.", "letters", 3),
    ("I would choose E.", "letters", 4),
    ("I think it's B.", "letters", 1),
    ("My final choice is D", "letters", 3),
    ("Therefore, the final answer is $\\boxed{D}$.", "letters", 3),
    ("\\boxed{E}", "letters", 4),
    ("The best option is (A) cat.", "letters", 0),
    ("Option D is correct.", "letters", 3),
    ("answer: d", "letters", 3),
    ("ANSWER: B", "letters", 1),
    ("Answer: B because the fuselage is short.", "letters", 1),
    ("Answer: A because of the whiskers.", "letters", 0),  # "A" + a word that names no option: the letter
    ("Answer: An Airbus A320.", "letters", 4),
    ("The answer is a horse, not a cat.", "letters", 3),
    ("The answer is D) horse", "letters", 3),
    ("I think this is a horse; the answer is D.", "letters", 3),
    ("The answer is B, not C.", "letters", 1),
    ("Answer: F", "letters", None),  # outside the options shown
    ("Answer: I'm not sure.", "letters", None),
    ("I cannot determine the answer from this image.", "letters", None),
    # an echoed option list says nothing; what follows it does
    (ECHO, "letters", None),
    (ECHO + "\n\nThe image shows a horse.", "letters", 3),
    ("Options:\n" + ECHO + "\nThe answer is D.", "letters", 3),
    # Chinese and full-width forms
    ("根据图片，这是一匹马。答案：D", "letters", 3),
    ("图中是一架飞机，有翼尖小翼。正确答案是 C。", "letters", 2),
    ("我选择E。", "letters", 4),
    ("答案为（A）", "letters", 0),
    ("答案是Ｄ", "letters", 3),
    ("应该是B", "letters", 1),
    ("ＡＮＳＷＥＲ：Ｃ", "letters", 2),
    ("最终答案：**D**", "letters", 3),
    # a conclusion on the last line, no marker
    ("The image shows a four-legged animal with a mane and hooves.\nD", "letters", 3),
    ("Four legs, a mane, hooves.\nhorse", "letters", 3),
    ("Four legs, a mane, hooves.\nI", "letters", None),  # outside the options shown
    # names mode: only names count
    ("Answer: horse", "names", 3),
    ("<think>Wings, winglets, two engines.</think>\nBoeing 737-800", "names", 2),
    ("The aircraft has a long fuselage and winglets. Answer: Boeing 737-800", "names", 2),
    ("Answer: A horse.", "names", 3),
    ("Answer: B", "names", None),
    ("I'd say it's an Airbus A320.", "names", 4),
    ("Based on the image, I believe it's a Boeing 737.", "names", 1),
    ("- cat\n- horse\nAnswer: horse", "names", 3),
    ("- cat\n- horse", "names", None),
    ("答案：horse", "names", 3),
    ("It is not a horse, it's a cat.", "names", None),  # a negation is not read: unparseable, not wrong
    ("The answer is cat or horse, I'm not sure.", "names", None),
    ("Final answer: **Airbus A320**", "names", 4),
    ("<think>A cat has whiskers; this has a mane.</think>\n\nThe answer is the horse.", "names", 3),
    ("My final answer: Boeing 737-800 (with winglets)", "names", 2),
    ("I believe it's a Boeing 737-800, not a Boeing 737.", "names", 2),
]


@pytest.mark.parametrize("answer,style,expected", REASONING_TABLE)
def test_parse_reasoning_answers(answer, style, expected):
    assert parse_answer(answer, OPTIONS, style) == expected


def test_final_text_drops_think_blocks_and_full_width_forms():
    assert final_text("<think>maybe A</think>\nＡｎｓｗｅｒ：（Ｂ）。") == "\n\nAnswer:(B)."
    assert final_text("reasoning only, its tag in the prompt</think> B") == " B"
    assert final_text("B <think>cut off") == "B "


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


def test_reasoning_prompt_in_context_turns_end_with_the_answer_line():
    ex = [Exemplar(Image.new("RGB", (8, 8)), "rocket"), Exemplar(Image.new("RGB", (8, 8)), "dog")]
    p = build_prompt(_req(examples=ex), PromptConfig(reasoning=True))
    replies = [m["content"][0]["text"] for m in p.messages if m["role"] == "assistant"]
    assert replies == ["Answer: C", "Answer: dog"]
    assert p.messages[-1]["content"][1]["text"].endswith(
        "'Answer: X', where X is the letter of the option shown."
    )
    plain = build_prompt(_req(examples=ex), PromptConfig())
    assert [m["content"][0]["text"] for m in plain.messages if m["role"] == "assistant"] == ["C", "dog"]
