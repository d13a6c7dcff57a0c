"""Synthetic many-class name lists and datasets (tests and bench/classes.py): thousands of classes offline.

Names look like species names: two or three words, many sharing a genus (a long common prefix), so
tokenizers split them into several tokens and candidate lists share prefixes, as iNaturalist's do.
"""

from __future__ import annotations

from pathlib import Path

import datasets

GENERA = (
    "Acanthis", "Accipiter", "Aegithalos", "Alauda", "Anas", "Anser", "Anthus", "Apus", "Ardea", "Asio",
    "Aythya", "Bombycilla", "Bubo", "Buteo", "Calidris", "Carduelis", "Certhia", "Charadrius", "Ciconia",
    "Circus", "Columba", "Corvus", "Cuculus", "Cygnus", "Delichon", "Dendrocopos", "Egretta", "Emberiza",
    "Erithacus", "Falco", "Ficedula", "Fringilla", "Gallinago", "Garrulus", "Grus", "Haematopus", "Hirundo",
    "Larus", "Limosa", "Locustella", "Loxia", "Motacilla", "Numenius", "Oenanthe", "Parus", "Passer",
    "Phylloscopus", "Picus", "Sylvia", "Turdus",
)  # fmt: skip
EPITHETS = (
    "alba", "arctica", "borealis", "canus", "caudatus", "cinerea", "communis", "cristatus", "europaea",
    "familiaris", "flammea", "fusca", "glandarius", "graculus", "hiaticula", "islandica", "major", "marina",
    "minor", "montanus", "nigra", "nivalis", "ochropus", "palustris", "pratensis", "rustica", "scolopax",
    "spinus", "tinnunculus", "troglodytes",
)  # fmt: skip


def synthetic_class_names(n: int) -> list[str]:
    """``n`` distinct species-like names (case-insensitively distinct), in a fixed order.

    ``Genus epithet`` for the first 1,500 (30 names share each genus), then ``Genus epithet varN``:
    multi-token names with long shared prefixes, as fine-grained taxonomies have.
    """
    base = [f"{g} {e}" for g in GENERA for e in EPITHETS]
    return [base[i % len(base)] + (f" var{i // len(base)}" if i >= len(base) else "") for i in range(n)]


def relabelled_dataset(
    source: datasets.DatasetDict, class_names: list[str], out_dir: str | Path, rows: int
) -> Path:
    """``source``'s first ``rows`` images of each split saved under ``out_dir`` with a ``class_names``
    label feature: source label ``l`` becomes class ``l * (len(class_names) // 10)`` (spread over the
    list, so true classes are not all at its start)."""
    step = max(1, len(class_names) // 10)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    out = datasets.DatasetDict()
    for split, ds in source.items():
        part = ds.select(range(min(rows, len(ds))))
        labels = [min(int(lab) * step, len(class_names) - 1) for lab in part["label"]]
        part = part.remove_columns("label").add_column("label", labels)
        out[split] = part.cast(feats)
    out.save_to_disk(str(out_dir))
    return Path(out_dir)
