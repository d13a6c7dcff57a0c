"""In-context k-shot examples for LVLM prompts, drawn from the k-shot split for the candidate classes."""

from __future__ import annotations

from collections import OrderedDict

import datasets
from PIL import Image

from cascadevlm.data.kshot import KShotSplit
from cascadevlm.data.loading import IMAGE_COLUMN, decode_image, load_dataset_dict
from cascadevlm.lvlm.base import Exemplar, LVLMRequest


class ExemplarPool:
    """Labelled k-shot images by class, handed out as in-context examples for a request's candidates.

    Examples go round-robin over the candidates in CLIP's order (the first shot of every candidate, then
    the second, ...), up to ``max_examples``, so a cap keeps the most probable classes represented.

    Args:
        dataset: the split the k-shot indices point into (rows with ``image`` and ``label``).
        split: the k-shot split (class id -> row indices).
        class_names: names by class id, as the candidates spell them.
        shots_per_class: at most this many examples per candidate class.
        max_examples: at most this many examples per prompt (the query image comes on top).
        cache_size: decoded images kept in memory.
        queries_from_pool_split: the queries are rows of ``dataset`` itself (the evaluated split is the
            k-shot split's split): :meth:`attach` then never shows a query its own row as an example.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        split: KShotSplit,
        class_names: list[str],
        shots_per_class: int = 1,
        max_examples: int = 4,
        cache_size: int = 256,
        queries_from_pool_split: bool = False,
    ) -> None:
        self.dataset = dataset
        self.split = split
        self.class_names = list(class_names)
        self.shots_per_class = shots_per_class
        self.max_examples = max_examples
        self.cache_size = cache_size
        self.queries_from_pool_split = queries_from_pool_split
        self._ids = {n.casefold(): i for i, n in enumerate(self.class_names)}
        self._images: OrderedDict[int, Image.Image] = OrderedDict()

    @classmethod
    def from_source(cls, dataset: str, kshot_path: str, split: str = "train", **kwargs) -> ExemplarPool:
        """A pool over a dataset directory / hub name and a k-shot split file."""
        dsd = load_dataset_dict(dataset)
        if split not in dsd:
            raise ValueError(f"dataset {dataset!r} has no split {split!r}; it has {list(dsd)}")
        ds = dsd[split]
        names = kwargs.pop("class_names", None) or ds.features["label"].names
        return cls(ds, KShotSplit.load(kshot_path), names, **kwargs)

    def image(self, row: int) -> Image.Image:
        if row in self._images:
            self._images.move_to_end(row)
            return self._images[row]
        img = decode_image(self.dataset[row][IMAGE_COLUMN], f"k-shot row {row}")
        self._images[row] = img
        if len(self._images) > self.cache_size:
            self._images.popitem(last=False)
        return img

    def for_candidates(self, candidates: list[str], exclude_rows: set[int] | None = None) -> list[Exemplar]:
        """In-context examples for ``candidates`` (names); rows in ``exclude_rows`` are skipped (e.g. the
        query itself when it comes from the same split). Unknown names get no examples."""
        exclude = exclude_rows or set()
        per_class = []
        for name in candidates:
            cid = self._ids.get(name.casefold())
            rows = [r for r in self.split.indices.get(cid, []) if r not in exclude] if cid is not None else []
            per_class.append((name, rows[: self.shots_per_class]))
        out: list[Exemplar] = []
        for shot in range(self.shots_per_class):
            for name, rows in per_class:
                if len(out) >= self.max_examples:
                    return out
                if shot < len(rows):
                    out.append(Exemplar(image=self.image(rows[shot]), class_name=name))
        return out

    def attach(self, requests: list[LVLMRequest], query_rows: list[int] | None = None) -> list[LVLMRequest]:
        """Fill each request's ``examples`` from the pool (in place); returns ``requests``.

        ``query_rows``: each request's row in its split; with ``queries_from_pool_split`` a query's own
        row is skipped (a labelled copy of the query would give its answer away)."""
        rows = (
            query_rows if self.queries_from_pool_split and query_rows is not None else [None] * len(requests)
        )
        if len(rows) != len(requests):
            raise ValueError(f"{len(rows)} query rows for {len(requests)} requests")
        for r, row in zip(requests, rows, strict=True):
            r.examples = self.for_candidates(r.candidates, None if row is None else {row})
        return requests
