"""Cascade prompts: an image, CLIP's candidates as lettered or named options, optional in-context turns.

Wording lives in :class:`PromptConfig` (set from YAML), never in code paths. A prompt is built as a
list of chat messages in the Hugging Face content format (``{"type": "image"}`` / ``{"type": "text"}``
parts) plus the images in the order they appear; the transformers backend renders it with the model's
chat template and the API backend converts it to the OpenAI wire format.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from cascadevlm.lvlm.base import NEW_SETTING, Exemplar, LVLMRequest

LETTERS = string.ascii_uppercase

# Generation lengths when none is set: a direct answer is a letter or a name; a reasoning answer is a
# few sentences, then its "Answer: X" line (8B-class models write 100-300 tokens for it).
SHORT_ANSWER_TOKENS = 16
REASONING_ANSWER_TOKENS = 512
# Below this, a reasoning answer is cut before its final line: refused.
MIN_REASONING_TOKENS = 64


@dataclass
class PromptConfig:
    """Everything that decides the text of a cascade prompt.

    Args:
        question: the question; ``{noun}`` is replaced by ``noun`` (e.g. "aircraft variant").
        noun: what one class is. ``dataset`` (a registered benchmark) sets it when given.
        dataset: a benchmark name from the registry, for dataset-aware wording.
        options: ``letters`` ("A. Boeing 737") answered by a letter, or ``names`` answered by a name.
        layout: the user text; fields ``{question}``, ``{options}``, ``{instruction}``.
        letter_option / name_option: how one option line looks (``{letter}``, ``{name}``).
        letter_instruction / name_instruction: what to answer with.
        letter_answer / name_answer: the answer text for an option (in-context turns, scoring, LoRA).
        reasoning: ask the model to explain first, then end with a final ``Answer: X`` line
            (``letter_reasoning_instruction`` / ``name_reasoning_instruction`` replace the instruction);
            generate mode only. The parser reads the last answer marker; the generation length, unless
            set, becomes :data:`REASONING_ANSWER_TOKENS`. It changes the answers, so it is part of the
            answer fingerprint (run name, resume, cache key) when set (at its default it is left out, so
            runs made before it existed keep their names).
        shuffle: present candidates in a random order (ablation); ``shuffle_seed`` and the request's
            image key and candidates seed the order, so a rerun shows the same order.
        max_images: cap on images per prompt, query included; extra in-context examples are dropped.
        system: an optional system message.
    """

    question: str = "Which of these {noun}s is shown in the image?"
    noun: str = "object"
    dataset: str | None = None
    options: Literal["letters", "names"] = "letters"
    layout: str = "{question}\nOptions:\n{options}\n{instruction}"
    letter_option: str = "{letter}. {name}"
    name_option: str = "- {name}"
    letter_instruction: str = "Answer with the option's letter."
    name_instruction: str = "Answer with the option's name."
    letter_answer: str = "{letter}"
    name_answer: str = "{name}"
    reasoning: bool = field(default=False, metadata=NEW_SETTING)
    letter_reasoning_instruction: str = field(
        default=(
            "First explain briefly, step by step, what in the image tells these options apart. "
            "Then end with a final line of the form 'Answer: X', where X is the letter of the option shown."
        ),
        metadata=NEW_SETTING,
    )
    name_reasoning_instruction: str = field(
        default=(
            "First explain briefly, step by step, what in the image tells these options apart. "
            "Then end with a final line of the form 'Answer: <name>', with the option's name as written above."
        ),
        metadata=NEW_SETTING,
    )
    shuffle: bool = False
    shuffle_seed: int = 0
    max_images: int = 8
    system: str | None = None

    def resolved_noun(self) -> str:
        if self.dataset:
            from cascadevlm.data.registry import get_benchmark

            return get_benchmark(self.dataset).noun
        return self.noun


@dataclass
class Prompt:
    """A rendered-ready prompt and how its displayed options map back to the request's candidates.

    ``order[d]`` is the candidate position shown as option ``d``; ``answers[d]`` is option ``d``'s answer
    text and ``labels[d]`` the label a reader sees (a letter, or the name).
    """

    messages: list[dict]
    images: list[Image.Image]
    order: list[int]
    options: list[str]  # displayed names, in display order
    answers: list[str]
    style: str
    examples: list[Exemplar] = field(default_factory=list)

    def candidate_of(self, display: int) -> int:
        return self.order[display]

    def display_of(self, candidate: int) -> int:
        return self.order.index(candidate)


def option_order(request: LVLMRequest, config: PromptConfig) -> list[int]:
    """Display order of the candidates: CLIP's order, or a reproducible shuffle."""
    order = list(range(len(request.candidates)))
    if config.shuffle:
        seed_text = f"{config.shuffle_seed}|{request.key or ''}|{'|'.join(request.candidates)}"
        seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "big")
        random.Random(seed).shuffle(order)
    return order


def answer_text(config: PromptConfig, display: int, name: str) -> str:
    """The answer for option ``display`` (a letter or a name, per ``config.options``)."""
    fmt = config.letter_answer if config.options == "letters" else config.name_answer
    return fmt.format(letter=LETTERS[display], name=name)


def user_text(config: PromptConfig, names: list[str]) -> str:
    """The user turn's text for options ``names`` (in display order)."""
    if config.options == "letters":
        if len(names) > len(LETTERS):
            raise ValueError(f"{len(names)} candidates but lettered options stop at {len(LETTERS)}")
        lines = [config.letter_option.format(letter=LETTERS[i], name=n) for i, n in enumerate(names)]
        instruction = config.letter_reasoning_instruction if config.reasoning else config.letter_instruction
    else:
        lines = [config.name_option.format(name=n) for n in names]
        instruction = config.name_reasoning_instruction if config.reasoning else config.name_instruction
    question = config.question.format(noun=config.resolved_noun())
    return config.layout.format(question=question, options="\n".join(lines), instruction=instruction).strip()


def answer_tokens(config: PromptConfig, mode: str, requested: int | None, option: str, short: int) -> int:
    """The generation length for ``config``: ``requested``, else ``short`` for a direct answer and
    :data:`REASONING_ANSWER_TOKENS` for a reasoning prompt. Refuses a reasoning prompt in score mode
    (nothing is generated to reason in) and a length that would cut the reasoning before its answer.

    Args:
        mode: the backend's mode (``score`` or ``generate``).
        requested: the length the user set, or None.
        option: the flag that sets the length, for the messages (``lvlm.init_args.max_new_tokens``).
        short: the backend's default length for a direct answer.
    """
    if requested is not None and requested < 1:
        raise ValueError(f"{option} must be >= 1 or null, got {requested}")
    if not config.reasoning:
        return short if requested is None else requested
    if mode != "generate":
        raise ValueError(
            f"lvlm.init_args.prompt.reasoning asks the model to explain before answering, which only "
            f"generate mode reads: set lvlm.init_args.mode generate, or prompt.reasoning false (mode is {mode!r})"
        )
    if requested is None:
        return REASONING_ANSWER_TOKENS
    if requested < MIN_REASONING_TOKENS:
        raise ValueError(
            f"{option} {requested} cuts a reasoning answer before its final 'Answer:' line: leave it unset "
            f"({REASONING_ANSWER_TOKENS}) or set it to at least {MIN_REASONING_TOKENS}"
        )
    return requested


def _user_message(text: str) -> dict:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}


def _assistant_message(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def build_prompt(request: LVLMRequest, config: PromptConfig) -> Prompt:
    """Messages for ``request``: optional system turn, one (user, assistant) turn per in-context example
    (same options, answered with the example's class), then the query image with its options."""
    if not request.candidates:
        raise ValueError("an LVLM request needs at least one candidate class name")
    order = option_order(request, config)
    names = [request.candidates[c] for c in order]
    answers = [answer_text(config, d, n) for d, n in enumerate(names)]
    text = user_text(config, names)
    examples = list(request.examples)[: max(config.max_images - 1, 0)]

    messages: list[dict] = []
    if config.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": config.system}]})
    images: list[Image.Image] = []
    folded = [n.casefold() for n in names]
    for ex in examples:
        name = ex.class_name
        # An example's class is normally one of the options; otherwise it is answered by name.
        shown = folded.index(name.casefold()) if name.casefold() in folded else None
        reply = answers[shown] if shown is not None else name
        if config.reasoning:  # the final line the instruction asks for (no explanation is known for it)
            reply = f"Answer: {reply}"
        messages += [_user_message(text), _assistant_message(reply)]
        images.append(ex.image)
    messages.append(_user_message(text))
    images.append(request.image)
    return Prompt(
        messages=messages,
        images=[_rgb(im) for im in images],
        order=order,
        options=names,
        answers=answers,
        style=config.options,
        examples=examples,
    )


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")
