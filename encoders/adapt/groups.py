"""From mined pairs to training items: groups of images believed to show the same thing, and the
dataset of (anchor, positive) pairs drawn from them.

A group is a connected component of the graph whose edges are the mined cross-domain pairs; an
image in no pair is a group of its own. With mutual nearest neighbours and a cycle check, the
groups are mostly one image per domain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cdir.core.errors import CdirError
from cdir.core.images import DECODE_ERRORS, load_image

# How many following images to try when one is unreadable.
_MAX_SUBSTITUTES = 32


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Group id of each of ``n`` nodes, for the undirected edges (a[t], b[t]): the smallest
    node index of its connected component (so ids are deterministic)."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(np.asarray(a, np.int64).tolist(), np.asarray(b, np.int64).tolist(),
                    strict=True):
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([root(i) for i in range(n)], dtype=np.int64)


def group_stats(groups: np.ndarray, domains: np.ndarray) -> dict[str, float]:
    """Label-free summary of a grouping: how many images have a partner, and the group sizes."""
    _, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    grouped = sizes[inverse] > 1
    return {"grouped": float(grouped.mean()) if len(groups) else 0.0,
            "groups": int((sizes > 1).sum()), "largest_group": int(sizes.max(initial=0))}


class Partners:
    """For each image, the members of its group in other domains (flat arrays, no Python lists
    per image: cheap to send to data-loader workers)."""

    def __init__(self, groups: np.ndarray, domains: np.ndarray) -> None:
        groups = np.asarray(groups, np.int64)
        self.domains = np.asarray(domains, np.int64)
        self.order = np.argsort(groups, kind="stable")
        g_sorted = groups[self.order]
        starts = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]])
        ends = np.r_[starts[1:], len(groups)]
        rank = np.empty(len(groups), np.int64)
        rank[self.order] = np.arange(len(groups))
        which = np.searchsorted(starts, rank, side="right") - 1
        self.start, self.end = starts[which], ends[which]

    def of(self, i: int) -> np.ndarray:
        members = self.order[self.start[i]:self.end[i]]
        return members[self.domains[members] != self.domains[i]]


class PairedImages(Dataset):
    """Items ``([view of anchor, view of positive], tensor([anchor, positive]), ok)``.

    With probability ``focus`` the item's anchor is replaced by a random image that has a
    partner (more cross-domain positives per batch while few images have one). The positive is
    a random partner of the anchor's group with probability ``partner_p`` (when it has one),
    else the anchor itself. A corrupt anchor is replaced by the next readable image
    (``ok`` False, so the trainer can list it); a corrupt partner by the anchor itself."""

    def __init__(self, paths: Sequence[str], domains: np.ndarray, transform: Callable,
                 partner_p: float, focus: float = 0.0) -> None:
        if not paths:
            raise CdirError("the training set is empty")
        self.paths = list(paths)
        self.domains = np.asarray(domains, np.int64)
        self.transform = transform
        self.partner_p, self.focus = float(partner_p), float(focus)
        self.set_groups(np.arange(len(self.paths)))

    def set_groups(self, groups: np.ndarray) -> None:
        self.partners = Partners(groups, self.domains)
        sizes = np.bincount(groups, minlength=len(groups))
        self.grouped = np.flatnonzero(sizes[groups] > 1)

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, i: int) -> object | None:
        try:
            return load_image(self.paths[i])
        except DECODE_ERRORS:
            return None

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], torch.Tensor, bool]:
        n = len(self.paths)
        # always draw the same numbers, so the random stream does not depend on the groups
        swap, which = float(torch.rand(())), int(torch.randint(1 << 30, ()))
        if len(self.grouped) and swap < self.focus:
            index = int(self.grouped[which % len(self.grouped)])
        for step in range(_MAX_SUBSTITUTES):
            i = (index + step) % n
            img = self._load(i)
            if img is not None:
                break
        else:
            raise CdirError(f"{_MAX_SUBSTITUTES} unreadable images in a row from "
                            f"{self.paths[index]}; check the data")
        j, other = i, img
        members = self.partners.of(i)
        coin, pick = float(torch.rand(())), int(torch.randint(1 << 30, ()))
        if len(members) and coin < self.partner_p:
            j = int(members[pick % len(members)])
            other = self._load(j)
            if other is None:
                j, other = i, img
        return [self.transform(img), self.transform(other)], torch.tensor([i, j]), step == 0
