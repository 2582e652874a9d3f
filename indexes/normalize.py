"""Search-time, label-free normalisation of embeddings with per-domain gallery statistics, and
hubness-corrected scores (CSLS, inverted softmax).

The domain of every gallery image is known (its folder), so per-domain statistics are legitimate
without labels. A fitted :class:`DomainNormalizer` holds, per domain, the mean and (for
whitening) a symmetric whitening matrix; a vector of domain d becomes

    none            x / |x|
    domain-center   (x - mu_d) / |x - mu_d|
    domain-whiten   W_d (x - mu_d), L2-normalised,   W_d = S_d^(-1/2)  (ZCA: symmetric)

with the shrunk covariance S_d = (1 - a_d) C_d + a_d tr(C_d)/D I. ZCA (not PCA) whitening keeps
every domain in the original coordinates, so vectors of different domains stay comparable.

Shrinkage rule (``shrinkage="ledoit-wolf"``, the default): a_d is the Ledoit-Wolf estimate for
domain d (the same formula as ``sklearn.covariance.ledoit_wolf_shrinkage``), which grows by itself
when n_d is small against D, then floored by ``min_shrinkage`` (default 0.01: measured on the
emoji gallery, P@1 is flat for a in [0.01, 0.1]). A number in [0, 1] fixes a_d for every domain.
A domain with fewer than ``min_count`` images has no usable statistics of its own: it uses the
statistics pooled over the whole gallery (its own centroid is still kept, for domain inference).
With a = 0 and n_d <= D the covariance is singular: directions without variance are projected out
(pseudo-inverse square root), so the result is the identity on the spanned subspace.

Shared PCA (``pca_dim`` N, label-free): before the per-domain statistics, every row is
centred by the mean of all gallery rows and projected on their top N principal directions, one
projection for every domain, so the domains stay comparable. The statistics then live in N
dims: a file of about 4 (k D + D + D N + k N + k N^2) bytes for k domains of D-d input
(:func:`stats_bytes`) instead of 4 (2 k D + k D^2): independent of the number of rows (1 M
rows of 6,144-d in 6 domains: 0.15 MB of centroids, 12.6 MB of components, 6.3 MB of
whitening at N = 512, against 906 MB at full size).

CSLS (Conneau et al., 2018): CSLS(x, y) = 2 cos(x, y) - r_T(x) - r_S(y), where r_T(x) is the
mean cosine of a query x to its k nearest gallery items and r_S(y) that of a gallery item y to
its k nearest queries (the query domain's indexed images). Inverted softmax (Smith et al., 2017)
normalises each gallery item's scores over the query collection instead. Both r-terms are
computed blockwise: never a full N x N matrix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdir.core.errors import CdirError
from cdir.core.io import atomic_path
from cdir.core.knn import (
    DEFAULT_BLOCK,
    DEFAULT_MEMORY_MB,
    as_matrix,
    neighbourhood_mean,
    similarity_blocks,
)
from cdir.core.store import RowView

STATE_FORMAT = 1
DEFAULT_SHRINKAGE = "ledoit-wolf"
DEFAULT_MIN_SHRINKAGE = 0.01
DEFAULT_MIN_COUNT = 10
# The shared PCA a domain-whiten normaliser gets unless told otherwise (--normalize-dim): chosen
# on the emoji dev categories (bench/README.md): the statistics shrink 29x against full size
# for a small loss of P@1, and queries get faster.
DEFAULT_PCA_DIM = 512
# Eigenvalues below this fraction of the largest count as zero (singular covariance, a = 0).
_RANK_TOL = 1e-6


@dataclass(frozen=True)
class Method:
    """What a normalisation method does to a vector of a known domain."""

    center: bool  # subtract the domain mean
    whiten: bool  # then apply the domain's whitening matrix
    help: str


# The one list of method names: keys of the dispatch table.
NORMALIZERS: dict[str, Method] = {
    "none": Method(False, False, "L2 normalisation only (the plain cosine)"),
    "domain-center": Method(True, False, "subtract the domain mean, re-L2-normalise"),
    "domain-whiten": Method(True, True, "per-domain ZCA whitening with shrinkage, L2-normalised"),
}


def _l2(z: np.ndarray) -> np.ndarray:
    return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def _moments(x: np.ndarray, block: int, second: bool = True
             ) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, covariance C = Xc^T Xc / n, sum of |xc|^4) of the rows of ``x`` in float64, the
    centred rows taken ``block`` at a time so no float64 copy of ``x`` is made. Without
    ``second`` only the mean is computed (C is empty): O(N D) instead of O(N D^2)."""
    n, d = x.shape
    mean = np.zeros(d)
    for s in range(0, n, block):
        mean += x[s:s + block].sum(0, dtype=np.float64)
    mean /= n
    if not second:
        return mean, np.zeros((0, 0)), 0.0
    cov = np.zeros((d, d))
    fourth = 0.0
    for s in range(0, n, block):
        xc = x[s:s + block].astype(np.float64) - mean
        cov += xc.T @ xc
        fourth += float(((xc * xc).sum(1) ** 2).sum())
    return mean, cov / n, fourth


def ledoit_wolf_shrinkage(cov: np.ndarray, fourth: float, n: int) -> float:
    """The Ledoit-Wolf shrinkage toward tr(C)/D I from the covariance ``cov`` (divided by n) of
    ``n`` centred rows and the sum of their fourth powers of norms (sklearn's formula)."""
    d = cov.shape[0]
    mu = np.trace(cov) / d
    delta_ = float((cov * cov).sum())  # |X^T X|_F^2 / n^2
    beta = (fourth / n - delta_) / (d * n)
    delta = (delta_ - d * mu * mu) / d  # |C - mu I|_F^2 / D
    beta = min(beta, delta)
    return 0.0 if beta <= 0 or delta <= 0 else float(beta / delta)


def _whitening(cov: np.ndarray, alpha: float) -> np.ndarray:
    """Symmetric (pseudo-)inverse square root of (1 - alpha) C + alpha tr(C)/D I."""
    d = cov.shape[0]
    shrunk = (1.0 - alpha) * cov + alpha * np.trace(cov) / d * np.eye(d)
    vals, vecs = np.linalg.eigh(shrunk)
    keep = vals > _RANK_TOL * max(float(vals.max()), 1e-30)
    inv_sqrt = np.zeros_like(vals)
    inv_sqrt[keep] = 1.0 / np.sqrt(vals[keep])
    return (vecs * inv_sqrt) @ vecs.T


def _whitening_low_rank(x: np.ndarray, mean: np.ndarray, alpha: float) -> np.ndarray:
    """:func:`_whitening` of the covariance of rows ``x`` (n < D) from the n x n Gram matrix:
    the covariance has rank < n, so its eigenvectors with non-zero eigenvalues are
    ``Xc^T v / sqrt(n lambda)`` and the rest of the space only sees the shrinkage term. The
    same matrix (up to rounding), in O(n^2 D) instead of the O(D^3) of a D x D eigendecomposition
    (e.g. 1,275 images of 4,096-d features: about 2 s instead of about 50 s on 2 cores)."""
    n, d = x.shape
    xc = x.astype(np.float64) - mean
    vals, vecs = np.linalg.eigh(xc @ xc.T / n)
    trace = float(vals.sum())  # tr(C) = tr(Gram)
    keep = vals > _RANK_TOL * max(float(vals.max()), 1e-30)
    vals, vecs = vals[keep], vecs[:, keep]
    basis = xc.T @ (vecs / np.sqrt(n * vals))  # orthonormal eigenvectors of C, D x r
    floor = alpha * trace / d  # the shrunk eigenvalue of every direction outside the basis
    scale = 1.0 / np.sqrt((1.0 - alpha) * vals + floor)
    outside = 1.0 / np.sqrt(floor) if floor > 0 else 0.0  # alpha 0: projected out
    return (basis * (scale - outside)) @ basis.T + outside * np.eye(d)


def _shrinkage_setting(shrinkage: float | str) -> float | str:
    if isinstance(shrinkage, str):
        if shrinkage != "ledoit-wolf":
            try:
                shrinkage = float(shrinkage)
            except ValueError:
                raise CdirError(f"shrinkage must be 'ledoit-wolf' or a number in [0, 1], "
                                f"not {shrinkage!r}") from None
    if not isinstance(shrinkage, str) and not 0.0 <= float(shrinkage) <= 1.0:
        raise CdirError(f"shrinkage must be in [0, 1], not {shrinkage}")
    return shrinkage if isinstance(shrinkage, str) else float(shrinkage)


class DomainNormalizer:
    """Per-domain normalisation fitted on a gallery (see the module docstring).

    ``fit`` reads the gallery vectors and their domain names; ``transform`` maps rows of known
    domains; ``transform_query`` maps a query whose domain may be unknown (then the domain with
    the nearest centroid, by cosine, is used). The fitted state is a dict of numpy arrays
    (``to_state``/``from_state``), saved as an ``.npz`` (``save``/``load``) with a fingerprint of
    the statistics that an index sidecar can record.
    """

    def __init__(self, method: str = "domain-whiten", shrinkage: float | str = DEFAULT_SHRINKAGE,
                 min_shrinkage: float = DEFAULT_MIN_SHRINKAGE,
                 min_count: int = DEFAULT_MIN_COUNT, block: int = DEFAULT_BLOCK,
                 pca_dim: int = 0):
        if method not in NORMALIZERS:
            raise CdirError(f"unknown normalisation {method!r}: choose one of "
                            f"{', '.join(NORMALIZERS)}")
        if not 0.0 <= min_shrinkage <= 1.0:
            raise CdirError(f"min_shrinkage must be in [0, 1], not {min_shrinkage}")
        self.method = method
        self.shrinkage = _shrinkage_setting(shrinkage)
        self.min_shrinkage = float(min_shrinkage)
        self.min_count = max(1, int(min_count))
        self.block = max(1, int(block))
        if isinstance(pca_dim, bool) or not isinstance(pca_dim, (int, np.integer)) or pca_dim < 0:
            raise CdirError(f"the PCA dimension must be a non-negative integer, not {pca_dim!r}")
        self.pca_dim = int(pca_dim)  # 0: none; asked for, before the data cap it (pca_out)
        self.pca_mean = np.zeros(0, np.float32)
        self.pca_components = np.zeros((0, 0), np.float32)  # [D, N]; empty without PCA
        self.domains: list[str] = []
        self._index: dict[str, int] = {}

    # -- fitting --------------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        return bool(self.domains)

    @property
    def dim(self) -> int:
        """The dimension of the vectors it takes (the encoder's)."""
        return int(self.centroids.shape[1])

    @property
    def out_dim(self) -> int:
        """The dimension of the vectors it gives (the index's): the PCA's, or ``dim``."""
        return int(self.pca_components.shape[1]) if self.pca_components.size else self.dim

    def _project(self, x: np.ndarray) -> np.ndarray:
        """Rows in the shared PCA's coordinates (unchanged without a PCA)."""
        if not self.pca_components.size:
            return x
        return ((x - self.pca_mean) @ self.pca_components).astype(np.float32, copy=False)

    def _alpha(self, cov: np.ndarray, fourth: float, n: int) -> float:
        if self.shrinkage == "ledoit-wolf":
            alpha = ledoit_wolf_shrinkage(cov, fourth, n)
        else:
            alpha = float(self.shrinkage)
        return max(alpha, self.min_shrinkage) if self.shrinkage == "ledoit-wolf" else alpha

    def fit(self, x: np.ndarray, domains: Sequence[str] | np.ndarray) -> DomainNormalizer:
        """Fit the per-domain statistics of gallery rows ``x`` [N, D] with domain names
        ``domains`` [N]. O(N D^2) time, O(D^2) extra memory per domain. ``x`` may be a view
        read on demand (`cdir.core.store.StoredRows`): only one domain's rows are then in memory
        at a time (the shared PCA, with ``pca_dim``, reads them all at once only when there are
        fewer rows than dims). With ``pca_dim`` the statistics are those of the projected rows,
        O(N D N' + N N'^2); N' = min(pca_dim, rank of the rows)."""
        x = as_matrix(x) if isinstance(x, np.ndarray) or not hasattr(x, "shape") else x
        dom = np.asarray(domains).astype(str)
        if dom.shape != (len(x),):
            raise CdirError(f"{len(x)} embeddings for {dom.size} domain names")
        if len(x) == 0:
            raise CdirError("cannot fit a normaliser on an empty gallery")
        spec = NORMALIZERS[self.method]
        names = sorted(set(dom.tolist()))  # byte-sorted: the same order on every machine
        k, d_in = len(names), x.shape[1]
        self.pca_mean = np.zeros(0, np.float32)
        self.pca_components = np.zeros((0, 0), np.float32)
        if 0 < self.pca_dim < d_in:
            self.pca_mean, self.pca_components = _pca(x, self.pca_dim, self.block)
        # domain centroids stay in the input space (domain inference of a raw query)
        raw_centroids = np.stack([_moments(as_matrix(x[dom == name]), self.block, False)[0]
                                  for name in names]).astype(np.float32)
        if self.pca_components.size:
            x = _Projected(self, x)
        d = self.out_dim if self.pca_components.size else d_in
        pooled_stats = None
        self.counts = np.zeros(k, np.int64)
        self.centroids = np.zeros((k, d), np.float32)
        self.means = np.zeros((k, d), np.float32)
        self.alphas = np.full(k, np.nan)
        self.pooled = np.zeros(k, bool)
        self.matrices = np.zeros((k, d, d) if spec.whiten else (k, 0, 0), np.float32)
        for i, name in enumerate(names):
            rows = as_matrix(x[dom == name])
            self.counts[i] = len(rows)
            mean, cov, fourth = _moments(rows, self.block, spec.whiten)
            self.centroids[i] = mean
            if len(rows) < self.min_count:  # too few images for statistics of its own
                if pooled_stats is None:
                    pooled_stats = _moments(x, self.block, spec.whiten)
                mean, cov, fourth = pooled_stats
                self.pooled[i] = True
            n = len(x) if self.pooled[i] else len(rows)
            if spec.center:
                self.means[i] = mean
            if spec.whiten:
                self.alphas[i] = self._alpha(cov, fourth, n)
                if n < d:  # fewer images than dimensions: the fast, exact low-rank route
                    src = np.asarray(x) if self.pooled[i] else rows
                    self.matrices[i] = _whitening_low_rank(src, mean, self.alphas[i])
                else:
                    self.matrices[i] = _whitening(cov, self.alphas[i])
        self.centroids = raw_centroids
        self.domains = names
        self._index = {name: i for i, name in enumerate(names)}
        return self

    def _require(self) -> None:
        if not self.fitted:
            raise CdirError("the normaliser is not fitted: call fit() or load() first")

    # -- transforming ---------------------------------------------------------------------------
    def _apply(self, x: np.ndarray, i: int) -> np.ndarray:
        out = np.empty_like(x)
        for s in range(0, len(x), self.block):
            z = x[s:s + self.block] - self.means[i]
            if self.matrices.shape[1]:
                z = z @ self.matrices[i]  # W is symmetric: rows times W = (W x)^T
            out[s:s + self.block] = _l2(z)
        return out

    def _codes(self, domains: Sequence[str] | np.ndarray, n: int) -> np.ndarray:
        dom = np.asarray(domains).astype(str)
        if dom.shape != (n,):
            raise CdirError(f"{n} embeddings for {dom.size} domain names")
        unknown = sorted(set(dom.tolist()) - set(self._index))
        if unknown:
            raise CdirError(f"domain(s) {', '.join(map(repr, unknown[:5]))} not in the fitted "
                            f"gallery (known: {', '.join(self.domains)})")
        return np.array([self._index[d] for d in dom.tolist()], np.int64)

    def transform(self, x: np.ndarray, domains: Sequence[str] | np.ndarray) -> np.ndarray:
        """Normalise rows ``x`` [N, D] whose domains ``domains`` [N] are in the fitted gallery;
        float32, L2-normalised rows."""
        self._require()
        x = as_matrix(x)
        self._check_dim(x)
        codes = self._codes(domains, len(x))
        x = self._project(x)
        out = np.empty_like(x)
        for i in np.unique(codes):
            rows = np.flatnonzero(codes == i)
            out[rows] = self._apply(x[rows], int(i))
        return out

    def transform_rows(self, x: np.ndarray, domains: Sequence[str] | np.ndarray
                       ) -> NormalizedRows:
        """`transform` of a view read on demand, applied to the rows a caller reads from it."""
        self._require()
        return NormalizedRows(self, x, np.asarray(domains).astype(str))

    def infer_domain(self, x: np.ndarray) -> np.ndarray:
        """The fitted domain whose centroid is nearest (cosine) to each row of ``x`` [N, D]."""
        self._require()
        x = as_matrix(x)
        self._check_dim(x)
        sims = _l2(x) @ _l2(self.centroids).T
        return np.asarray(self.domains)[sims.argmax(1)]

    def transform_query(self, x: np.ndarray, domain: str | Sequence[str] | None = None
                        ) -> tuple[np.ndarray, str | np.ndarray]:
        """Normalise query vector(s) ``x`` ([D] or [N, D]) as if of ``domain`` (a name, one name
        per row, or None: the nearest centroid's domain per row). Returns (x', the domain(s)
        used): a name for a 1-d query, an array of names for a 2-d one."""
        self._require()
        single = np.ndim(x) == 1
        q = as_matrix(np.atleast_2d(x), "query embeddings")
        if domain is None:
            used = self.infer_domain(q)
        elif isinstance(domain, str):
            used = np.full(len(q), domain)
        else:
            used = np.asarray(domain).astype(str)
        out = self.transform(q, used)
        return (out[0], str(used[0])) if single else (out, used)

    def _check_dim(self, x: np.ndarray) -> None:
        if x.shape[1] != self.dim:
            raise CdirError(f"embeddings have dim {x.shape[1]}, the normaliser was fitted on "
                            f"dim {self.dim}")

    # -- state ----------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "format": np.array(STATE_FORMAT, np.int64),
            "method": np.array(self.method),
            "shrinkage": np.array(str(self.shrinkage)),
            "min_shrinkage": np.array(self.min_shrinkage, np.float64),
            "min_count": np.array(self.min_count, np.int64),
            "domains": np.array(self.domains, dtype=str),
            "counts": self.counts,
            "pooled": self.pooled,
            "alphas": self.alphas,
            "centroids": self.centroids,
            "means": self.means,
            "matrices": self.matrices,
            # only with a PCA: a plain state keeps the arrays (and fingerprint) it always had
            **({"pca_dim": np.array(self.pca_dim, np.int64), "pca_mean": self.pca_mean,
                "pca_components": self.pca_components} if self.pca_components.size else {}),
        }

    @staticmethod
    def _fingerprint(arrays: dict[str, np.ndarray]) -> str:
        h = hashlib.sha256()
        for key in sorted(arrays):
            a = np.ascontiguousarray(arrays[key])
            h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
            h.update(a.tobytes())
        return h.hexdigest()[:16]

    @property
    def fingerprint(self) -> str:
        """A short hash of the method, the settings and every fitted statistic."""
        self._require()
        return self._fingerprint(self._arrays())

    def to_state(self) -> dict[str, np.ndarray]:
        """The fitted state: numpy arrays only (no pickling needed), fingerprint included."""
        self._require()
        arrays = self._arrays()
        return {**arrays, "fingerprint": np.array(self._fingerprint(arrays))}

    def pooled_note(self) -> str | None:
        """A line naming the domains too small for statistics of their own (they use the whole
        gallery's), or None when every domain has its own."""
        self._require()
        small = [f"{name} ({int(self.counts[i])} image{'s' if self.counts[i] != 1 else ''})"
                 for i, name in enumerate(self.domains) if self.pooled[i]]
        if not small:
            return None
        return (f"warning: fewer than {self.min_count} images for {self.method} statistics of "
                f"their own: {', '.join(small)}; the statistics pooled over the whole gallery "
                "are used instead")

    def summary(self) -> dict:
        """Plain metadata for a sidecar or a report: method, settings, per-domain n and a."""
        self._require()
        return {
            "method": self.method, "shrinkage": self.shrinkage,
            "min_shrinkage": self.min_shrinkage, "min_count": self.min_count,
            "dim": self.dim, "out_dim": self.out_dim, "pca_dim": self.pca_dim,
            "fingerprint": self.fingerprint,
            "domains": {name: {"n": int(self.counts[i]), "pooled": bool(self.pooled[i]),
                               **({"alpha": float(self.alphas[i])}
                                  if np.isfinite(self.alphas[i]) else {})}
                        for i, name in enumerate(self.domains)},
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> DomainNormalizer:
        """Rebuild a fitted normaliser from ``to_state()``; refuses a state whose fingerprint
        does not match its statistics (a damaged or hand-edited file)."""
        try:
            if int(state["format"]) != STATE_FORMAT:
                raise CdirError(f"normaliser state format {int(state['format'])} is not "
                                f"{STATE_FORMAT}: refit it")
            self = cls(str(state["method"]), str(state["shrinkage"]),
                       float(state["min_shrinkage"]), int(state["min_count"]))
            self.domains = [str(d) for d in np.asarray(state["domains"]).tolist()]
            self.counts = np.asarray(state["counts"], np.int64)
            self.pooled = np.asarray(state["pooled"], bool)
            self.alphas = np.asarray(state["alphas"], np.float64)
            self.centroids = np.asarray(state["centroids"], np.float32)
            self.means = np.asarray(state["means"], np.float32)
            self.matrices = np.asarray(state["matrices"], np.float32)
            if "pca_components" in state:  # absent in states written before the option
                self.pca_dim = int(state["pca_dim"])
                self.pca_mean = np.asarray(state["pca_mean"], np.float32)
                self.pca_components = np.asarray(state["pca_components"], np.float32)
            want = str(state["fingerprint"])
        except KeyError as e:
            raise CdirError(f"normaliser state lacks {e.args[0]!r}: refit it") from None
        self._index = {name: i for i, name in enumerate(self.domains)}
        if not self.domains or self.fingerprint != want:
            raise CdirError("normaliser state does not match its fingerprint: refit it")
        return self

    def save(self, path: str | Path) -> Path:
        """Write the state to ``path`` (.npz) atomically; returns the path."""
        path = Path(path)
        state = self.to_state()
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
                np.savez(f, **state)
        return path

    @classmethod
    def load(cls, path: str | Path) -> DomainNormalizer:
        """Read a normaliser written by ``save``."""
        try:
            with np.load(path, allow_pickle=False) as data:
                state = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise CdirError(f"cannot read the normaliser {path}: {e}") from None
        return cls.from_state(state)


class NormalizedRows(RowView):
    """Rows of a matrix or view, normalised by a fitted `DomainNormalizer` as they are read."""

    def __init__(self, norm: DomainNormalizer, x: np.ndarray, domains: np.ndarray):
        if domains.shape != (len(x),):
            raise CdirError(f"{len(x)} embeddings for {domains.size} domain names")
        super().__init__(len(x), norm.out_dim)
        self.norm, self.x, self.domains = norm, x, domains

    def _read(self, pos: np.ndarray) -> np.ndarray:
        return self.norm.transform(self.x[pos], self.domains[pos])


class _Projected(RowView):
    """Rows of a matrix or view in a fitted normaliser's shared PCA coordinates, as read."""

    def __init__(self, norm: DomainNormalizer, x: np.ndarray):
        super().__init__(len(x), norm.out_dim)
        self.norm, self.x = norm, x

    def _read(self, pos: np.ndarray) -> np.ndarray:
        return self.norm._project(as_matrix(self.x[pos]))


def _pca(x: np.ndarray, n: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], top-``n`` principal directions [D, n']) of the rows of ``x``, n' = min(n,
    rank). Fewer rows than dims: from the Gram matrix (O(N^2 D)); otherwise from the
    covariance accumulated a block at a time (O(N D^2), never a float64 copy of ``x``)."""
    rows, d = x.shape
    if rows <= d:
        xc = as_matrix(x[:]).astype(np.float64)
        mean = xc.mean(0)
        xc -= mean
        vals, vecs = np.linalg.eigh(xc @ xc.T)
        order = np.argsort(vals)[::-1]
        vals, vecs = vals[order], vecs[:, order]
        keep = vals > _RANK_TOL * max(float(vals[0]), 1e-30)
        vals, vecs = vals[keep][:n], vecs[:, keep][:, :n]
        comps = xc.T @ (vecs / np.sqrt(vals))
    else:
        mean = np.zeros(d)
        for s in range(0, rows, block):
            mean += as_matrix(x[s:s + block]).sum(0, dtype=np.float64)
        mean /= rows
        cov = np.zeros((d, d))
        for s in range(0, rows, block):
            xc = as_matrix(x[s:s + block]).astype(np.float64) - mean
            cov += xc.T @ xc
        vals, vecs = np.linalg.eigh(cov)
        order = np.argsort(vals)[::-1]
        vals, vecs = vals[order], vecs[:, order]
        keep = vals > _RANK_TOL * max(float(vals[0]), 1e-30)
        comps = vecs[:, keep][:, :n]
    # a fixed sign per direction: the same statistics from the same rows
    flip = np.sign(comps[np.abs(comps).argmax(0), np.arange(comps.shape[1])])
    return mean.astype(np.float32), (comps * flip).astype(np.float32)


def stats_bytes(domains: int, dim: int, pca_dim: int = 0, whiten: bool = True) -> int:
    """The float32 payload of a normaliser's statistics file (the .npz adds a few kB of headers)
    for ``domains`` domains of ``dim``-d input, a shared PCA to ``pca_dim`` (0: none, or not
    below ``dim``). It does not grow with the number of rows."""
    out = pca_dim if 0 < pca_dim < dim else dim
    pca = dim + dim * out if out < dim else 0
    return 4 * (domains * dim + pca + domains * out + (domains * out * out if whiten else 0))


def resolve_pca_dim(method: str, dim: int, requested: int | None) -> tuple[int, str]:
    """(the shared PCA dimension to fit, 0 for none; a line saying what was chosen and why) for
    ``method`` over ``dim``-d vectors: ``requested`` None takes `DEFAULT_PCA_DIM` for
    domain-whiten when the vectors are wider, 0 keeps the full dimension."""
    if requested is not None and (isinstance(requested, bool) or requested < 0):
        raise CdirError(f"--normalize-dim must be a non-negative integer, not {requested!r}")
    if method == "none":
        if requested:
            raise CdirError("--normalize-dim goes with --normalize (a method other than none)")
        return 0, ""
    if requested is None:
        if method != "domain-whiten" or dim <= DEFAULT_PCA_DIM:
            return 0, ""
        return DEFAULT_PCA_DIM, (f"shared PCA {dim} -> {DEFAULT_PCA_DIM} dims before {method} "
                                 f"(the default; --normalize-dim 0 keeps all {dim})")
    if requested == 0 or requested >= dim:
        return 0, f"{method} at the full {dim} dims (no shared PCA)"
    return requested, f"shared PCA {dim} -> {requested} dims before {method}"


def fit_normalizer(x: np.ndarray, domains: Sequence[str] | np.ndarray,
                   method: str = "domain-whiten", **options) -> DomainNormalizer:
    """``DomainNormalizer(method, **options).fit(x, domains)``."""
    return DomainNormalizer(method, **options).fit(x, domains)


# -- hubness correction --------------------------------------------------------------------------


def csls_terms(a: np.ndarray, b: np.ndarray, k: int = 10, block: int = DEFAULT_BLOCK
               ) -> tuple[np.ndarray, np.ndarray]:
    """(r_a, r_b) for queries ``a`` against gallery ``b``: r_a over b's items, r_b over a's."""
    return neighbourhood_mean(a, b, k, block), neighbourhood_mean(b, a, k, block)


def csls_scores(q: np.ndarray, g: np.ndarray, r_q: np.ndarray, r_g: np.ndarray) -> np.ndarray:
    """CSLS(x, y) = 2 cos(x, y) - r_q(x) - r_g(y) for a block of queries ``q`` [n, D] against
    gallery rows ``g`` [m, D] (L2-normalised); [n, m] float32."""
    return (2.0 * (np.asarray(q, np.float32) @ np.asarray(g, np.float32).T)
            - np.asarray(r_q, np.float32)[:, None] - np.asarray(r_g, np.float32)[None, :])


def inverted_softmax_log_norm(g: np.ndarray, bank: np.ndarray, beta: float = 30.0,
                              block: int = DEFAULT_BLOCK,
                              memory_mb: float = DEFAULT_MEMORY_MB) -> np.ndarray:
    """log sum_{x in bank} exp(beta cos(x, y)) for each gallery row y of ``g``: the per-item
    normaliser of the inverted softmax, with ``bank`` the query domain's indexed images."""
    g, bank = as_matrix(g), as_matrix(bank)
    out = np.empty(len(g), np.float64)
    for rows, sims in similarity_blocks(g, bank, block, memory_mb):
        z = beta * sims.astype(np.float64)
        top = z.max(1)
        out[rows] = top + np.log(np.exp(z - top[:, None]).sum(1))
    return out


def inverted_softmax_scores(q: np.ndarray, g: np.ndarray, log_norm_g: np.ndarray,
                            beta: float = 30.0) -> np.ndarray:
    """log of the inverted softmax, beta cos(x, y) - log_norm(y), for queries ``q`` against
    gallery rows ``g``; monotone in the inverted softmax itself, so rankings agree."""
    sims = np.asarray(q, np.float32) @ np.asarray(g, np.float32).T
    return (beta * sims - np.asarray(log_norm_g, np.float32)[None, :]).astype(np.float32)
