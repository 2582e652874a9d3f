"""The fixed dev/test split of a gallery's categories.

Each category is assigned once, from a hash of its name alone, so the split is the same on every
machine and a category keeps its side when others are added or removed. Choices (recipes,
feature layouts, thresholds, epochs) are made on ``dev``; figures are reported on ``test``.
Label-free training still sees every image: the split only says which categories a score may be
computed on.
"""

from __future__ import annotations

import hashlib

# the values written to the manifest's `split` column by galleries with a category split
CATEGORY_SPLITS = ("dev", "test")


def category_split(name: str) -> str:
    """``dev`` or ``test`` for the category ``name`` (about half each)."""
    digest = hashlib.sha256(f"cdir-split-v1:{name}".encode()).digest()
    return CATEGORY_SPLITS[digest[0] & 1]
