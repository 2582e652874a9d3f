"""A label-free estimate of the precision of mined cross-domain pairs.

Model (instance galleries: one item per category per domain). The nearest-neighbour links of a
category's items are right with a probability p that varies from category to category (some are
easy in every domain, some hopeless), and a wrong link rarely leads back home by chance. Then,
for domains A, B and a third C, with E the mean over categories:

- a mutual pair of A and B is right with probability E[p^2]: the precision of the mutual pairs
  is E[p^2] / mutual_rate(A, B), the observed share of A's items in a mutual pair;
- the 3-cycle A -> B -> C -> A closes with probability about E[p^3] (``c3``);
- the closed walk A -> B -> C -> A -> C -> B -> A (all six links of the triangle) closes with
  probability about E[p^6] (``c6``).

log E[p^k] is convex in k; interpolated log-linearly through k = 3 and 6, E[p^2] is about
c3 (c3 / c6)^(1/3): c3^(2/3) when p is the same for every category (c6 = c3^2), c3 when every
category is either easy or hopeless (c6 = c3). So

    precision(A, B) = min(1, c3 (c3 / c6)^(1/3) / mutual_rate(A, B))

(c3, c6: means over the third domains and both starting domains). A pair set's estimate is this
value per domain pair, weighted by the set's pairs in each domain pair.

What it measures: how reliable the *features'* nearest-neighbour links are against how many
mutual pairs they produce, from the cycles of the whole gallery; it does not see the filters
applied to the set (cycle check, confidence threshold), so for a filtered set it estimates the
precision of the mutual candidates the filters started from (a lower bound where they help).
Consistently wrong triangles (a group of similar categories confused the same way in every
domain) close cycles too: there it reads high.

Calibration, measured (``bench/miner_quality.py``, mutual-NN pairs): synthetic instance
galleries (300 categories, 3 domains, noise from clean to lost, true precision 1.0 -> 0.06):
Spearman 1.0, mean |estimate - true| 0.16 without category families (low in the middle of the
sweep: 0.38 for 0.74) and 0.11 with them; 12 real emoji feature sets (3 encoders, plain and
whitened at 3 widths, true 0.44 -> 0.71): Spearman 0.85, mean |estimate - true| 0.09.
Fewer than three domains: NaN (no cycles).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np

from cdir.core.knn import DEFAULT_BLOCK
from encoders.adapt.mining import Pairs, cycle_rate, nn_maps


def link_model(x: np.ndarray, domains: Sequence[str] | np.ndarray,
               maps: dict[tuple[str, str], np.ndarray] | None = None,
               block: int = DEFAULT_BLOCK) -> dict[str, dict[str, float]]:
    """Per unordered domain pair ``"A|B"`` (byte order): ``mutual_rate`` (mean of both
    directions), ``c3``, ``c6`` and the estimated ``precision`` of its mutual pairs (module
    docstring). ``maps``: the nearest-neighbour maps of :func:`encoders.adapt.mining.nn_maps`,
    when already computed."""
    names = sorted(set(np.asarray(domains).astype(str).tolist()))
    if maps is None:
        maps = nn_maps(x, domains, block)
    sizes = {s: len(m) for (s, _), m in maps.items()}
    out: dict[str, dict[str, float]] = {}
    for s, t in combinations(names, 2):
        mutual = [float((maps[(v, u)][maps[(u, v)]] == np.arange(sizes[u])).mean())
                  for u, v in ((s, t), (t, s)) if sizes[u]]
        turns = [(u, v, c) for c in names if c not in (s, t) for u, v in ((s, t), (t, s))]
        c3 = [cycle_rate([maps[(u, v)], maps[(v, c)], maps[(c, u)]]) for u, v, c in turns]
        c6 = [cycle_rate([maps[(u, v)], maps[(v, c)], maps[(c, u)],
                          maps[(u, c)], maps[(c, v)], maps[(v, u)]]) for u, v, c in turns]
        m = float(np.mean(mutual)) if mutual else float("nan")
        p3 = float(np.mean(c3)) if c3 else float("nan")
        p6 = float(np.mean(c6)) if c6 else float("nan")
        if not (m > 0 and np.isfinite(p3)):
            est = float("nan")
        elif p6 > 0:
            est = min(1.0, p3 * (p3 / p6) ** (1 / 3) / m)
        else:  # no walk closes: nothing is reliable
            est = 0.0
        out[f"{s}|{t}"] = {"mutual_rate": m, "c3": p3, "c6": p6, "precision": est}
    return out


def estimate_precision(x: np.ndarray, domains: Sequence[str] | np.ndarray,
                       pairs: Pairs | None = None,
                       maps: dict[tuple[str, str], np.ndarray] | None = None,
                       block: int = DEFAULT_BLOCK) -> float:
    """The estimated precision of ``pairs`` (global rows of ``x``: normalised, L2 rows, with
    ``domains``), label-free (module docstring); without ``pairs``, of all mutual pairs with
    every domain pair weighted equally. NaN below three domains or without pairs."""
    model = link_model(x, domains, maps, block)
    dom = np.asarray(domains).astype(str)
    vals, weights = [], []
    for key, rec in model.items():
        s, t = key.split("|")
        if pairs is None:
            w = 1.0
        else:
            da, db = dom[pairs.a], dom[pairs.b]
            w = float((((da == s) & (db == t)) | ((da == t) & (db == s))).sum())
        if w > 0 and np.isfinite(rec["precision"]):
            vals.append(rec["precision"])
            weights.append(w)
    if not vals:
        return float("nan")
    return float(np.average(vals, weights=weights))


# -- calibration --------------------------------------------------------------------------------

def synthetic_gallery(noise: float, families: int = 0, n: int = 300, d: int = 64,
                      domains: int = 3, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An instance gallery whose ``noise`` sets how precise mining on it can be, to calibrate
    the estimate against (the tests, `bench/miner_quality.py`): one item per category per domain,
    its category's centre plus a shift shared by the domain plus noise, rows centred per domain
    and L2-normalised. ``families`` > 0 draws the centres around that many family centres
    (confusable groups). Returns (vectors, category labels, domain names)."""
    def unit(z: np.ndarray) -> np.ndarray:
        return z / np.linalg.norm(z, axis=-1, keepdims=True)

    rng = np.random.default_rng(seed)
    if families:
        fam = unit(rng.normal(size=(families, d)))
        centres = unit(fam[rng.integers(0, families, n)] + 0.6 * rng.normal(size=(n, d)) / d**0.5)
    else:
        centres = unit(rng.normal(size=(n, d)))
    xs = []
    for _ in range(domains):
        z = centres + 0.5 * unit(rng.normal(size=d)) + noise * rng.normal(size=(n, d)) / d**0.5
        xs.append(unit(z - z.mean(0)))
    dom = np.repeat([f"d{t}" for t in range(domains)], n)
    return np.concatenate(xs).astype(np.float32), np.tile(np.arange(n), domains), dom


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two sequences without ties (how well the estimate orders
    galleries by their true precision)."""
    ra, rb = (np.argsort(np.argsort(np.asarray(v))).astype(float) for v in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])
