"""Map a free-text LVLM answer to one of the displayed options, or to ``None`` when it cannot.

First the text is reduced to what the model concluded (:func:`final_text`): ``<think>...</think>``
blocks dropped (an unclosed one is reasoning cut short: what follows it is no answer), full-width and
Chinese punctuation made ASCII ("Ｂ" -> "B", "（B）" -> "(B)", "答案：B" -> "答案:B").

Then, the first rule that decides wins:

1. **the last explicit answer marker**: "Answer: B", "**Final Answer:** (C)", "The answer is b.",
   "the correct option is the camera", "option B", "Letter E", "I'd say B", "I'll go with C",
   "I believe it's C", "I think this is an Airbus A320", "\\boxed{B}", a self-correction ("A. No
   wait, B."), "答案是 B", "答案：B", "选项B", "我选C". The text after the marker (to the end of its line)
   is read as a letter or a name (below); a marker whose text names nothing gives way to the one before;
2. the whole text (without an echoed option list: two or more lines that repeat the prompt's options,
   "A. cat\\nB. horse", say nothing): a letter at its start, a name, or, last, a lone letter or exact
   name on the last line (a conclusion after reasoning with no marker).

A text is read as an option, in order:

* lettered prompts only: a letter alone or marked as one ("B", "(B)", "B.", "B) cat", "**B**", "B
  because ...", "b."), within the options shown. A capital article before an option name is not a
  letter ("A horse." is the horse; "A because ..." is option A); a lower-case letter counts only on its
  own ("b.", "(d) horse", not "a cat"); a capital "I" followed by a word is the pronoun;
* an exact option name, ignoring case, punctuation and spacing ("boeing 737 800" == "Boeing 737-800");
* option names inside the text, as whole words: the longest matching one, when the others it matches
  are part of it ("a Boeing 737-800 in flight" -> "Boeing 737-800", not "Boeing 737"); two unrelated
  options ("a cat or a horse") are ambiguous, unless the first clause names one ("a horse, not a cat").

Anything else is unparseable: the caller falls back to CLIP's top-1 and counts it. The raw text is
kept unchanged in the records; only the choice comes from here.
"""

from __future__ import annotations

import re
import unicodedata

from cascadevlm.lvlm.prompts import LETTERS

UNPARSEABLE = "unparseable"

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.S | re.I)
# Punctuation NFKC leaves alone: ideographic full stop and comma, corner quotes, curly quotes.
_PUNCT = str.maketrans({"。": ".", "、": ",", "「": '"', "」": '"', "『": '"', "』": '"', "’": "'",
                        "‘": "'", "“": '"', "”": '"', "【": "[", "】": "]"})  # fmt: skip

# Explicit answer markers; the text after the last one that names an option is the answer.
_VERB = r"(?:\s*(?:is|was|would\s+be|should\s+be|must\s+be|will\s+be|seems\s+to\s+be|=|:|-))*"
_HEDGE = r"(?:\s+(?:likely|probably|clearly|definitely|most\s+likely))?"
_MARKERS = re.compile(
    "|".join(
        [
            rf"\banswer\b{_VERB}{_HEDGE}",
            rf"\b(?:correct|right|best|final)\s+(?:option|choice){_VERB}{_HEDGE}",
            r"\b(?:option|choice|letter)\b(?=\s*[\"'*(\[]*[A-Za-z](?![\w'-]))",  # "option B", not "options"
            r"\b(?:my|final)\s+(?:choice|pick|guess)" + _VERB,
            r"\bI(?:'d|\s+would)\s+(?:say|go\s+with|choose|pick|answer)(?:\s+(?:it(?:'s|\s+is)|that))?",
            r"\bI(?:'ll|\s+will)\s+(?:go\s+with|choose|pick|say)",
            r"\bI\s+(?:choose|pick|select)",
            r"\bI\s+(?:believe|think|guess)\s+(?:that\s+)?(?:it(?:'s|\s+is)|this\s+is|the\s+(?:image|photo)\s+shows)?",
            r"\b(?:no\s*,?\s*wait|wait\s*,?\s*no|actually|I\s+mean|correction:?|on\s+second\s+thought)\b",
            r"\\boxed\{",
            r"(?:最终|正确)?答案(?:应该)?(?:是|为|:)?",
            r"选项",
            r"我(?:选择?|认为是|觉得是)",
            r"应该是",
        ]
    ),
    re.I,
)
# After a marker: the characters between it and the answer ("**: ", " (", "\n\n").
_LEAD = " \t\n\"'*`:=,.-"
# A letter at the start of a text ("B", "(B)", "**B**", "option B"); group 2 is set when a word follows.
_LETTER = re.compile(
    r"^[\s\"'*`(\[]*(?:(?i:option|choice|letter)\s+)?[\"'*`(\[]*([A-Za-z])(?![\w'-])(\s+(?=\w))?"
)
# After a lower-case letter: only punctuation or the end ("b.", "(d) horse", "e, the A320").
_LOWER_END = re.compile(r"^[\"'*`)\]}.,;:!?]*(?:\s|$)")
# The first clause of a sentence: "a horse, not a cat" -> "a horse".
_CLAUSE = re.compile(r"[,;(]|\s(?:not|rather\s+than|instead\s+of|but|although)\s", re.I)
# An option line as the prompt shows it: "A. cat", "(B) horse", "- cat".
_OPTION_LINE = re.compile(r"^\s*(?:[-*•]\s*)?(?:\(?([A-Z])[.):]\s*)?(.+?)\s*$")


def normalize(text: str) -> str:
    """Casefold, strip accents and punctuation, collapse spaces: the form names are compared in."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).casefold()
    text = re.sub(r"[^\w]+", " ", text).replace("_", " ")
    return " ".join(text.split())


def final_text(text: str) -> str:
    """What the model concluded: ``<think>`` blocks dropped (and everything up to a closing tag whose
    opening tag was in the prompt), an unclosed block cut off, full-width and CJK punctuation as ASCII."""
    text = _THINK_BLOCK.sub("\n", text)
    lower = text.lower()
    if "</think>" in lower:  # Qwen3 / DeepSeek-R1 templates open the block in the prompt
        text = text[lower.rfind("</think>") + len("</think>") :]
        lower = text.lower()
    if "<think>" in lower:  # reasoning cut short by max_new_tokens: no answer after it
        text = text[: lower.find("<think>")]
    return unicodedata.normalize("NFKC", text).translate(_PUNCT)


def parse_letter(text: str, num_options: int, options: list[str] | None = None) -> int | None:
    """The option a letter at the start of ``text`` picks, or None (see the module doc for the rules)."""
    m = _LETTER.match(text)
    if not m:
        return None
    letter, word_follows = m.group(1), m.group(2) is not None
    if letter.islower():
        if word_follows or not _LOWER_END.match(text[m.end(1) :]):
            return None  # "a cat": an article
    elif word_follows and letter == "I":
        return None  # "I think ...": the pronoun
    elif word_follows and letter == "A" and options and parse_name(text[m.end() :], options) is not None:
        return None  # "A horse": an article before an option name
    pos = LETTERS.index(letter.upper())
    return pos if pos < num_options else None


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


def _read(text: str, options: list[str], style: str) -> int | None:
    """The option ``text`` states: a leading letter (lettered prompts), else a name in it, else a name
    in its first clause."""
    if style == "letters":
        pos = parse_letter(text, len(options), options)
        if pos is not None:
            return pos
    pos = parse_name(text, options)
    if pos is None:
        clause = _CLAUSE.split(text, maxsplit=1)[0]
        pos = parse_name(clause, options) if clause != text else None
    return pos


def _without_echo(text: str, options: list[str], style: str) -> str:
    """``text`` without its copy of the prompt's option list (two or more lines that repeat options)."""
    names = [normalize(o) for o in options]
    lines = text.splitlines()
    echoed = []
    for i, line in enumerate(lines):
        m = _OPTION_LINE.match(line)
        if not m or normalize(m.group(2)) not in names:
            continue
        letter = m.group(1)
        if letter is None and not line.lstrip().startswith(("-", "*", "•")):
            continue  # a bare name on its own line is an answer, not a list item
        if letter is not None and (
            style != "letters" or names.index(normalize(m.group(2))) != LETTERS.index(letter)
        ):
            continue
        echoed.append(i)
    if len(echoed) < 2:
        return text
    return "\n".join(line for i, line in enumerate(lines) if i not in set(echoed))


def parse_answer(text: str, options: list[str], style: str = "letters") -> int | None:
    """Position (in display order) of the option ``text`` picks, or None when it is unparseable.

    Args:
        text: the model's raw answer (reasoning included).
        options: the option names in the order they were shown.
        style: ``letters`` when options were lettered (letters are accepted, and names too);
            ``names`` when they were not (only names are accepted).
    """
    if not text or not text.strip():
        return None
    text = _without_echo(final_text(text), options, style)
    for marker in reversed(list(_MARKERS.finditer(text))):
        after = text[marker.end() :].lstrip(_LEAD)
        pos = _read(after.split("\n", 1)[0], options, style)
        if pos is not None:
            return pos
    pos = _read(text.strip(), options, style)
    if pos is not None:
        return pos
    lines = [line.strip(_LEAD) for line in text.strip().splitlines() if line.strip(_LEAD)]
    if len(lines) > 1:  # a conclusion on the last line: a lone letter or an exact name only
        last = lines[-1]
        if style == "letters" and re.fullmatch(r"[(\[]?[A-Z][)\].]?", last):
            pos = LETTERS.index(last.strip("()[]."))
            return pos if pos < len(options) else None
        names = [normalize(o) for o in options]
        if normalize(last) in names:
            return names.index(normalize(last))
    return None
