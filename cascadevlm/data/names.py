"""Readable class names for prompts when a dataset's classes are its folder names.

The rule (as the CLIP papers write folder-derived names in prompts):

1. a leading numeric id with a dot (CUB's ``001.``) or a WordNet id with a hyphen or underscore
   (ImageNet's and Stanford Dogs' ``n02085620-``) is dropped;
2. underscores become spaces, runs of spaces become one, ends are trimmed;
3. case, hyphens and everything else are kept (``Black_footed_Albatross`` -> ``Black footed Albatross``,
   ``yorkshire_terrier`` -> ``yorkshire terrier``, ``2012_Tesla_Model_S`` -> ``2012 Tesla Model S``);
4. a name that would become empty is kept as it is.

Records hold class ids; the dataset's own label names stay the folder names.
"""

from __future__ import annotations

import re

_ID_PREFIX = re.compile(r"^(?:\d+\.|n\d{8}[-_])(?=.)")

__all__ = ["readable_class_name", "readable_class_names"]


def readable_class_name(name: str) -> str:
    """A folder name as a prompt would say it (see the module's rule)."""
    readable = re.sub(r"\s+", " ", _ID_PREFIX.sub("", name).replace("_", " ")).strip()
    return readable or name


def readable_class_names(names: list[str], where: str = "dataset") -> list[str]:
    """:func:`readable_class_name` of each; two folders that would read the same are refused."""
    out = [readable_class_name(n) for n in names]
    seen: dict[str, str] = {}
    for original, readable in zip(names, out, strict=True):
        other = seen.setdefault(readable.casefold(), original)
        if other != original:
            raise ValueError(
                f"{where}: class folders {other!r} and {original!r} both read {readable!r} in prompts; "
                "pass --data.readable_names false (prompts use the folder names) or --data.class_names"
            )
    return out
