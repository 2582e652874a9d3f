"""Hubness-corrected scoring for the domain-pair protocol: a scorer wrapped so that a gallery item
close to everything (a hub) no longer wins every query.

``csls`` (Conneau et al., 2018): CSLS(x, y) = 2 cos(x, y) - r_T(x) - r_S(y), with r_T(x) the mean
cosine of query x to its k nearest items of the *gallery domain* and r_S(y) that of gallery item
y to its k nearest images of the *query domain* (all of them, whatever queries are asked: a
``query_mask`` restricts the queries, not the neighbourhoods). The r-terms are computed blockwise
by `cdir.core.knn.neighbourhood_mean` once per (query domain, gallery rows) and cached, so the
protocol's pair loop pays for them once per directed pair. No labels are used.

``dual-softmax``: log softmax_y(beta cos(x, y)) + log softmax_x(beta cos(x, y)), the first over
the *gallery domain's* images (the query's own normalisation, as r_T), the second over the *query
domain's* images (each gallery item's, as r_S): a soft mutual nearest neighbour. The second term is
the inverted softmax (Smith et al., 2017): a hub's high cosines are shared out among everything it
is close to. Both log-normalisers are per-row terms, computed and cached as CSLS's. beta 25 (a
temperature of 0.04), chosen on the emoji gallery's dev categories, where the mean P@1 was flat
for beta 17 to 33 (README, section 5).

numpy and torch are imported inside the functions: the command line reads `RERANKERS` while it
builds its parser.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

    from eval.topk import CosineScorer

DEFAULT_CSLS_K = 10
DEFAULT_DUAL_SOFTMAX_BETA = 25.0


class _RowTermsScorer:
    """A `CosineScorer` (same rows; ``domains`` names each row's domain) corrected by a term per
    query row over the gallery domain and one per gallery row over the query domain, cached per
    (query domain, gallery rows). Subclasses say what the terms are (:meth:`_compute`) and how
    they combine with the cosine (:meth:`_combine`)."""

    def __init__(self, base: CosineScorer, domains: np.ndarray):
        import numpy as np

        from cdir.core.errors import CdirError

        self.base = base
        self.domains = np.asarray(domains).astype(str)
        if self.domains.shape != (base.num_rows,):
            raise CdirError(f"{base.num_rows} scorer rows but {self.domains.size} domain names")
        # numpy copies for the r-terms (computed on the CPU, blockwise)
        self._q = base.query_vecs.float().cpu().numpy()
        self._g = base.gallery_vecs.float().cpu().numpy()
        self._cache: dict[tuple[str, bytes], tuple[np.ndarray, torch.Tensor]] = {}

    @property
    def num_rows(self) -> int:
        return self.base.num_rows

    def _terms(self, domain: str, gallery_rows: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """(r_T over every row of the scorer, NaN outside ``domain``; r_S of ``gallery_rows``)."""
        import hashlib

        import numpy as np
        import torch

        key = (domain, hashlib.sha1(np.ascontiguousarray(gallery_rows).tobytes()).digest())
        if key not in self._cache:
            bank = np.flatnonzero(self.domains == domain)
            r_q, r_g = self._compute(self._q[bank], self._g[gallery_rows])
            full = np.full(self.num_rows, np.nan, np.float32)
            full[bank] = r_q
            if len(self._cache) > 4:  # the pair loop moves on: old pairs are not asked again
                self._cache.clear()
            self._cache[key] = (full, torch.from_numpy(r_g).to(self.base.device))
        return self._cache[key]

    def scores(self, query_rows: np.ndarray, gallery_rows: np.ndarray) -> torch.Tensor:
        import numpy as np
        import torch

        query_rows = np.asarray(query_rows, np.int64)
        gallery_rows = np.asarray(gallery_rows, np.int64)
        names = np.unique(self.domains[query_rows])
        if not len(names):
            return self.base.scores(query_rows, gallery_rows)
        if len(names) > 1:  # r_S depends on the query domain: score each domain's rows apart
            return self._mixed(query_rows, gallery_rows)
        full, r_g = self._terms(str(names[0]), gallery_rows)
        cos = self.base.scores(query_rows, gallery_rows)
        r_q = torch.from_numpy(full[query_rows]).to(cos.device)
        return self._combine(cos, r_q, r_g)

    def _compute(self, bank: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the term of each query-domain row of ``bank``, that of each ``gallery`` row)."""
        raise NotImplementedError

    def _combine(self, cos: torch.Tensor, r_q: torch.Tensor, r_g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _mixed(self, query_rows: np.ndarray, gallery_rows: np.ndarray) -> torch.Tensor:
        import numpy as np
        import torch

        out = None
        for domain in np.unique(self.domains[query_rows]):
            at = np.flatnonzero(self.domains[query_rows] == domain)
            part = self.scores(query_rows[at], gallery_rows)
            if out is None:
                out = torch.empty((len(query_rows), len(gallery_rows)), dtype=part.dtype,
                                  device=part.device)
            out[torch.from_numpy(at).to(part.device)] = part
        return out


class CSLSScorer(_RowTermsScorer):
    """CSLS over a `CosineScorer` with neighbourhood ``k`` (module docstring)."""

    def __init__(self, base: CosineScorer, domains: np.ndarray, k: int = DEFAULT_CSLS_K):
        from cdir.core.errors import CdirError

        if isinstance(k, bool) or int(k) < 1:
            raise CdirError(f"the CSLS neighbourhood k must be a positive integer, not {k!r}")
        super().__init__(base, domains)
        self.k = int(k)

    def _compute(self, bank: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from indexes.normalize import csls_terms

        return csls_terms(bank, gallery, self.k)

    def _combine(self, cos: torch.Tensor, r_q: torch.Tensor, r_g: torch.Tensor) -> torch.Tensor:
        return 2.0 * cos - r_q[:, None] - r_g[None, :]


class DualSoftmaxScorer(_RowTermsScorer):
    """The dual softmax over a `CosineScorer` with inverse temperature ``beta`` (module
    docstring)."""

    def __init__(self, base: CosineScorer, domains: np.ndarray,
                 beta: float = DEFAULT_DUAL_SOFTMAX_BETA):
        import math

        from cdir.core.errors import CdirError

        if isinstance(beta, bool) or not (math.isfinite(float(beta)) and float(beta) > 0):
            raise CdirError(f"the dual softmax's beta must be a positive number, not {beta!r}")
        super().__init__(base, domains)
        self.beta = float(beta)

    def _compute(self, bank: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        from indexes.normalize import inverted_softmax_log_norm

        return (inverted_softmax_log_norm(bank, gallery, self.beta).astype(np.float32),
                inverted_softmax_log_norm(gallery, bank, self.beta).astype(np.float32))

    def _combine(self, cos: torch.Tensor, r_q: torch.Tensor, r_g: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.beta * cos - r_q[:, None] - r_g[None, :]


def _plain(base: CosineScorer, domains: np.ndarray, k: int, beta: float) -> CosineScorer:
    return base


def _csls(base: CosineScorer, domains: np.ndarray, k: int, beta: float) -> CSLSScorer:
    return CSLSScorer(base, domains, k)


def _dual_softmax(base: CosineScorer, domains: np.ndarray, k: int, beta: float
                  ) -> DualSoftmaxScorer:
    return DualSoftmaxScorer(base, domains, beta=beta)


@dataclass(frozen=True)
class Reranker:
    """``build(cosine scorer, row domains, neighbourhood k, beta)``: the scorer the protocol
    uses; ``uses_k`` / ``uses_beta``: whether the CSLS neighbourhood size / the dual softmax's
    beta changes it (a report then names it)."""

    build: Callable[..., object]
    uses_k: bool
    uses_beta: bool = False


RERANKERS: dict[str, Reranker] = {
    "none": Reranker(_plain, uses_k=False),
    "csls": Reranker(_csls, uses_k=True),
    "dual-softmax": Reranker(_dual_softmax, uses_k=False, uses_beta=True),
}
