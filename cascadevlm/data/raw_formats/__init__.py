"""Readers of the official raw downloads, one module per dataset; ``FORMATS`` lists them by name."""

from __future__ import annotations

from cascadevlm.data.raw_formats import aircraft, cars, cub, dtd, eurosat, flowers, food101, pets
from cascadevlm.data.raw_formats._common import (
    ClassIndex,
    Item,
    Listing,
    PrepareError,
    RawFormat,
    ReadOptions,
    normalise,
)

FORMATS: dict[str, RawFormat] = {
    m.FORMAT.name: m.FORMAT for m in (cars, aircraft, flowers, cub, pets, food101, dtd, eurosat)
}

__all__ = [
    "FORMATS",
    "ClassIndex",
    "Item",
    "Listing",
    "PrepareError",
    "RawFormat",
    "ReadOptions",
    "normalise",
]
