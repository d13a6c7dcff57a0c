"""Map a free-text LVLM answer to one of the displayed options, or to ``None`` when it cannot.

Rules, in order (the first that decides wins):

1. lettered prompts: a letter alone or marked as one ("B", "(B)", "B.", "B) cat", "**B**",
   "Answer: B", "**Answer:** B", "The answer is option B", "The answer is b."), within the options shown;
2. an exact option name, ignoring case, punctuation and spacing ("boeing 737 800" == "Boeing 737-800");
3. option names inside a sentence, as whole words: the longest matching one, when the others it
   matches are part of it ("a Boeing 737-800 in flight" -> "Boeing 737-800", not "Boeing 737");
   a sentence naming two unrelated options ("a cat or a horse") is ambiguous.

Anything else is unparseable: the caller falls back to CLIP's top-1 and counts it.
"""

from __future__ import annotations

import re
import unicodedata

from cascadevlm.lvlm.prompts import LETTERS

UNPARSEABLE = "unparseable"

# "B", "(B)", "[B]", "B.", "B)", "B:", "B. name", "B) name" at the start of the answer.
_LEADING_LETTER = re.compile(r"^[\s\"'*`(\[]*([A-Za-z])\s*(?:[.):\]*\"'`]|$)")
# "answer is B", "Answer: (B)", "**Answer:** B", "option B", "choice: B" anywhere; a lower-case letter
# only where it stands alone ("The answer is b.", not "the answer is a cat").
_MARKED_LETTER = re.compile(
    r"\b(?i:answer|option|choice|letter)(?:\s*(?i:is|:|=)|\s*\*+)*\s*(?i:option\s+|letter\s+)?[\"'*(\[]*"
    r"(?:([A-Z])\b(?![-'])|([a-z])(?=[\s\"'*`)\].,;:!]*$|[)\].,;:!]\s))"
)


def normalize(text: str) -> str:
    """Casefold, strip accents and punctuation, collapse spaces: the form names are compared in."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).casefold()
    text = re.sub(r"[^\w]+", " ", text).replace("_", " ")
    return " ".join(text.split())


def parse_letter(text: str, num_options: int) -> int | None:
    """The option picked by letter, or None."""
    stripped = text.strip()
    m = _LEADING_LETTER.match(stripped)
    if m and m.group(1).isupper():
        pos = LETTERS.index(m.group(1))
        if pos < num_options:
            return pos
    if m and len(stripped.strip("\"'*`()[]. ")) == 1:  # a lone lower-case letter: "b"
        pos = LETTERS.index(m.group(1).upper())
        if pos < num_options:
            return pos
    marked = [(upper or lower).upper() for upper, lower in _MARKED_LETTER.findall(text)]
    hits = {LETTERS.index(x) for x in marked if LETTERS.index(x) < num_options}
    if len(hits) == 1:
        return hits.pop()
    return None


def parse_name(text: str, options: list[str]) -> int | None:
    """The option named exactly, else the longest option named inside the text (see module doc), else None."""
    answer = normalize(text)
    if not answer:
        return None
    names = [normalize(o) for o in options]
    exact = [i for i, n in enumerate(names) if n and n == answer]
    if exact:
        return exact[0]
    padded = f" {answer} "
    found = {n for n in names if n and f" {n} " in padded}
    # A name inside a longer matching name ("boeing 737" in "boeing 737 800") is not a separate match.
    outer = {n for n in found if not any(n != m and f" {n} " in f" {m} " for m in found)}
    if len(outer) != 1:  # none, or two different options named: ambiguous
        return None
    return names.index(outer.pop())


def parse_answer(text: str, options: list[str], style: str = "letters") -> int | None:
    """Position (in display order) of the option ``text`` picks, or None when it is unparseable.

    Args:
        text: the model's raw answer.
        options: the option names in the order they were shown.
        style: ``letters`` when options were lettered (letters are accepted, and names too);
            ``names`` when they were not (only names are accepted).
    """
    if not text or not text.strip():
        return None
    if style == "letters":
        pos = parse_letter(text, len(options))
        if pos is not None:
            return pos
    return parse_name(text, options)
