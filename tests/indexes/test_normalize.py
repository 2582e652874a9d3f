"""Per-domain normalisation (indexes/normalize.py): the maths on hand-made vectors, the state and
its file, and the hubness corrections (CSLS, inverted softmax) against dense computations."""

from __future__ import annotations

import numpy as np
import pytest

from cdir.core.errors import CdirError
from cdir.core.knn import neighbourhood_mean
from indexes.normalize import (
    DEFAULT_PCA_DIM,
    NORMALIZERS,
    DomainNormalizer,
    csls_scores,
    csls_terms,
    inverted_softmax_log_norm,
    inverted_softmax_scores,
    ledoit_wolf_shrinkage,
    resolve_pca_dim,
    stats_bytes,
)
from tests.helpers.vectors import l2


def _gallery(seed: int = 0, n: int = 200, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Two domains with different means and anisotropic, correlated covariances."""
    rng = np.random.default_rng(seed)
    parts, names = [], []
    for k, name in enumerate(("sketch", "photo")):
        mix = rng.normal(size=(d, d)) * rng.uniform(0.2, 2.0, size=d)
        parts.append(rng.normal(size=(n, d)) @ mix + 3.0 * (k + 1) * rng.normal(size=d))
        names += [name] * n
    return np.concatenate(parts).astype(np.float32), np.array(names)


def test_every_method_dispatches_and_unknown_is_refused() -> None:
    x, dom = _gallery()
    for method in NORMALIZERS:
        z = DomainNormalizer(method).fit(x, dom).transform(x, dom)
        assert z.shape == x.shape and z.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(DomainNormalizer("none").fit(x, dom).transform(x, dom), l2(x),
                               atol=1e-6)
    with pytest.raises(CdirError, match="unknown normalisation"):
        DomainNormalizer("domain-magic")
    with pytest.raises(CdirError, match="shrinkage"):
        DomainNormalizer("domain-whiten", shrinkage="lots")


def test_centring_makes_each_domain_mean_zero() -> None:
    # domain d: mu_d +- e_i, so the centred rows all have norm 1 and the L2 step keeps the mean 0
    d = 4
    eye = np.eye(d, dtype=np.float32)
    mus = {"a": np.array([5.0, 0, 0, 1]), "b": np.array([0, -2.0, 3, 0])}
    x = np.concatenate([np.concatenate([mu + eye, mu - eye]) for mu in mus.values()])
    dom = np.repeat(list(mus), 2 * d)
    norm = DomainNormalizer("domain-center", min_count=2).fit(x, dom)
    z = norm.transform(x, dom)
    for name, mu in mus.items():
        np.testing.assert_allclose(z[dom == name].mean(0), 0.0, atol=1e-6)
        np.testing.assert_allclose(norm.means[norm.domains.index(name)], mu, atol=1e-6)


def test_whitening_without_shrinkage_gives_identity_covariance() -> None:
    x, dom = _gallery()
    norm = DomainNormalizer("domain-whiten", shrinkage=0.0).fit(x, dom)
    for i, name in enumerate(norm.domains):
        rows = x[dom == name].astype(np.float64)
        c = rows - rows.mean(0)
        w = norm.matrices[i].astype(np.float64)
        white = c @ w
        np.testing.assert_allclose(white.T @ white / len(c), np.eye(x.shape[1]), atol=1e-3)
        np.testing.assert_allclose(w, w.T, atol=1e-5)  # ZCA: symmetric
        np.testing.assert_allclose(norm.transform(x[dom == name], dom[dom == name]),
                                   l2(white), atol=1e-5)


def test_singular_covariance_is_identity_on_its_subspace() -> None:
    # 5 rows in 8 dimensions: rank 4 after centring; a = 0 whitens the span, drops the rest
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 8)).astype(np.float32)
    norm = DomainNormalizer("domain-whiten", shrinkage=0.0, min_count=1).fit(x, ["a"] * 5)
    c = x.astype(np.float64) - x.astype(np.float64).mean(0)
    white = c @ norm.matrices[0].astype(np.float64)
    cov = white.T @ white / len(c)
    proj = np.linalg.pinv(c, rcond=1e-8) @ c  # the projector onto the span of the centred rows
    np.testing.assert_allclose(cov, proj, atol=1e-3)
    assert np.isfinite(norm.transform(x, ["a"] * 5)).all()


def test_shrinkage_keeps_small_domains_finite() -> None:
    x, dom = _gallery(n=100, d=16)
    rng = np.random.default_rng(2)
    x = np.concatenate([x, rng.normal(size=(3, 16)).astype(np.float32) + 4.0])
    dom = np.concatenate([dom, ["tiny"] * 3])
    # min_count 2: "tiny" keeps its own statistics, and Ledoit-Wolf shrinks them hard
    norm = DomainNormalizer("domain-whiten", min_count=2).fit(x, dom)
    i = norm.domains.index("tiny")
    assert not norm.pooled[i] and norm.alphas[i] > 0.3 and norm.pooled_note() is None
    assert norm.alphas[i] > norm.alphas[norm.domains.index("photo")]
    assert np.isfinite(norm.matrices).all()
    vals = np.linalg.eigvalsh(norm.matrices[i].astype(np.float64))
    assert vals.max() / vals.min() < 100  # well conditioned despite 3 rows in 16 dimensions
    z = norm.transform(x, dom)
    assert np.isfinite(z).all()
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    # the default min_count: "tiny" uses the pooled statistics, its own centroid is kept
    pooled = DomainNormalizer("domain-whiten").fit(x, dom)
    assert pooled.pooled[i] and not pooled.pooled[:i].any()
    assert "their own: tiny (3 images); the statistics pooled" in pooled.pooled_note()
    np.testing.assert_allclose(pooled.centroids[i], x[-3:].mean(0), atol=1e-5)
    np.testing.assert_allclose(pooled.means[i], x.mean(0), atol=1e-4)
    assert np.isfinite(pooled.transform(x, dom)).all()
    # a fixed shrinkage is used as given; 1.0 reduces whitening to scaled centring
    iso = DomainNormalizer("domain-whiten", shrinkage=1.0).fit(x, dom)
    centred = DomainNormalizer("domain-center").fit(x, dom)
    np.testing.assert_allclose(iso.transform(x, dom), centred.transform(x, dom), atol=1e-5)


def test_ledoit_wolf_matches_sklearn() -> None:
    covariance = pytest.importorskip("sklearn.covariance")
    from indexes.normalize import _moments

    rng = np.random.default_rng(3)
    for n, d in ((6, 20), (300, 12)):
        x = (rng.normal(size=(n, d)) * rng.uniform(0.1, 2.0, size=d)).astype(np.float32)
        _, cov, fourth = _moments(x, block=7)  # blockwise moments: 7 rows at a time
        want = covariance.ledoit_wolf_shrinkage(x - x.mean(0))
        assert ledoit_wolf_shrinkage(cov, fourth, n) == pytest.approx(want, rel=1e-4)


def test_query_transform_matches_gallery_transform_and_infers_domain() -> None:
    x, dom = _gallery()
    norm = DomainNormalizer("domain-whiten").fit(x, dom)
    z = norm.transform(x, dom)
    for row in (0, 250):
        q, used = norm.transform_query(x[row], dom[row])
        assert used == dom[row]
        np.testing.assert_allclose(q, z[row], atol=1e-6)
    # no domain: the nearest centroid (cosine), row by row
    cents = l2(norm.centroids)
    probe = np.stack([cents[0] + 0.01, cents[1] - 0.01]).astype(np.float32)
    out, used = norm.transform_query(probe)
    assert list(used) == norm.domains
    np.testing.assert_allclose(out, norm.transform(probe, used), atol=1e-6)
    sims = l2(x) @ cents.T
    assert (norm.infer_domain(x) == np.array(norm.domains)[sims.argmax(1)]).all()
    one, name = norm.transform_query(probe[1])
    assert name == norm.domains[1] and one.shape == (x.shape[1],)
    with pytest.raises(CdirError, match="not in the fitted gallery"):
        norm.transform(x[:2], ["sketch", "clipart"])
    with pytest.raises(CdirError, match="dim"):
        norm.transform(x[:2, :4], ["sketch", "sketch"])
    with pytest.raises(CdirError, match="non-finite"):
        norm.fit(np.full((3, 2), np.nan, np.float32), ["a"] * 3)


def test_state_round_trip_and_fingerprint(tmp_path) -> None:
    x, dom = _gallery()
    norm = DomainNormalizer("domain-whiten").fit(x, dom)
    path = norm.save(tmp_path / "norm.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["norm.npz"]  # no temporary left
    back = DomainNormalizer.load(path)
    assert back.fingerprint == norm.fingerprint and back.domains == norm.domains
    for key, value in norm.to_state().items():
        np.testing.assert_array_equal(back.to_state()[key], value)
    np.testing.assert_array_equal(back.transform(x, dom), norm.transform(x, dom))
    assert back.summary()["domains"]["photo"]["n"] == 200
    # a name without .npz stays as given (np.savez would append the suffix to a name)
    assert norm.save(tmp_path / "norm.state").exists()
    # the fingerprint follows the statistics and the settings
    moved = x.copy()
    moved[0] += 0.01
    assert DomainNormalizer("domain-whiten").fit(moved, dom).fingerprint != norm.fingerprint
    assert DomainNormalizer("domain-whiten", shrinkage=0.2).fit(x, dom).fingerprint != \
        norm.fingerprint
    assert DomainNormalizer("domain-center").fit(x, dom).fingerprint != norm.fingerprint
    # a damaged state is refused
    state = norm.to_state()
    state["means"] = state["means"] + 1.0
    with pytest.raises(CdirError, match="fingerprint"):
        DomainNormalizer.from_state(state)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CdirError, match="cannot read"):
        DomainNormalizer.load(tmp_path / "junk.npz")


def test_csls_demotes_a_hub() -> None:
    d = 6
    eye = np.eye(d, dtype=np.float32)
    # every query is 0.8 from the hub e0 and 0.6 from its own partner e_i
    q = l2(0.8 * eye[0] + 0.6 * eye[1:])
    g = np.concatenate([eye[:1], eye[1:]])  # row 0: the hub, rows 1..5: the partners
    plain = q @ g.T
    assert (plain.argmax(1) == 0).all()
    r_q, r_g = csls_terms(q, g, k=3)
    scores = csls_scores(q, g, r_q, r_g)
    assert (scores.argmax(1) == np.arange(1, d)).all()
    np.testing.assert_allclose(scores, 2 * plain - r_q[:, None] - r_g[None, :], atol=1e-6)
    # inverted softmax: the hub's mass is spread over all queries, so it is demoted too
    log_z = inverted_softmax_log_norm(g, q, beta=30.0)
    assert (inverted_softmax_scores(q, g, log_z, 30.0).argmax(1) == np.arange(1, d)).all()


def test_blockwise_terms_equal_dense() -> None:
    rng = np.random.default_rng(4)
    a = l2(rng.normal(size=(53, 16))).astype(np.float32)
    b = l2(rng.normal(size=(41, 16))).astype(np.float32)
    dense = a @ b.T
    for k in (1, 5, 41, 100):  # k is capped at len(b)
        want = np.sort(dense, axis=1)[:, ::-1][:, :min(k, 41)].mean(1)
        for block, mb in ((4096, 256.0), (7, 256.0), (4096, 1e-4)):  # tiny budget: 1 row a time
            np.testing.assert_allclose(neighbourhood_mean(a, b, k, block, mb), want, atol=1e-6)
    beta = 20.0
    want = np.log(np.exp(beta * (b @ a.T).astype(np.float64)).sum(1))
    np.testing.assert_allclose(inverted_softmax_log_norm(b, a, beta, block=5), want, rtol=1e-6)


# -- shared PCA before the per-domain statistics -------------------------------------------------


@pytest.mark.parametrize("n", [20, 200])  # fewer rows than dims (Gram route), and more
def test_shared_pca_projects_on_the_top_principal_directions(n: int) -> None:
    x, dom = _gallery(n=n, d=48)
    norm = DomainNormalizer("domain-whiten", pca_dim=6).fit(x, dom)
    assert (norm.dim, norm.out_dim) == (48, 6)
    z = norm.transform(x, dom)
    assert z.shape == (len(x), 6)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    # the same subspace as the top right singular vectors of the centred rows (all domains)
    top = np.linalg.svd(x - x.mean(0), full_matrices=False)[2][:6].T
    cosines = np.linalg.svd(top.T @ norm.pca_components, compute_uv=False)
    np.testing.assert_allclose(cosines, 1.0, atol=1e-3)
    # queries: raw (encoder-width) vectors in, index-width vectors out, domain inferred raw
    q, used = norm.transform_query(x[:3])
    assert q.shape == (3, 6) and list(used) == list(norm.infer_domain(x[:3]))
    with pytest.raises(CdirError, match="dim 6"):
        norm.transform(z, dom)


def test_shared_pca_uses_no_labels_and_is_one_projection() -> None:
    x, dom = _gallery(n=100, d=32)
    a = DomainNormalizer(pca_dim=5).fit(x, dom)
    b = DomainNormalizer(pca_dim=5).fit(x, dom[::-1])  # domains swapped: same shared PCA
    np.testing.assert_array_equal(a.pca_components, b.pca_components)
    np.testing.assert_array_equal(a.pca_mean, b.pca_mean)


def test_pca_state_round_trip_and_older_states_load(tmp_path) -> None:
    x, dom = _gallery(n=60, d=40)
    norm = DomainNormalizer(pca_dim=7).fit(x, dom)
    back = DomainNormalizer.load(norm.save(tmp_path / "s.npz"))
    assert back.fingerprint == norm.fingerprint and back.out_dim == 7
    np.testing.assert_array_equal(back.transform(x, dom), norm.transform(x, dom))
    # another projection under the same fingerprint is refused
    state = norm.to_state()
    state["pca_components"] = state["pca_components"][:, ::-1].copy()
    with pytest.raises(CdirError, match="fingerprint"):
        DomainNormalizer.from_state(state)
    # a state written before the option (no PCA keys) still loads, at full width
    plain = DomainNormalizer().fit(x, dom).to_state()
    assert not any(k.startswith("pca") for k in plain)
    assert DomainNormalizer.from_state(plain).out_dim == 40


def test_statistics_size_formula_and_rows_do_not_count(tmp_path) -> None:
    """The file holds about 4 (k D + D + D N + k N + k N^2) bytes, whatever the number of rows:
    the formula checked on a small case, then applied to 1 M x 6,144-d in 6 domains."""
    for n in (60, 600):
        x, dom = _gallery(n=n, d=96)
        for pca in (0, 12):
            f = DomainNormalizer(pca_dim=pca).fit(x, dom).save(tmp_path / f"{n}-{pca}.npz")
            want = stats_bytes(2, 96, pca)
            assert want <= f.stat().st_size <= want + 8192, (n, pca)
    assert stats_bytes(2, 96, 12) == 4 * (2 * 96 + 96 + 96 * 12 + 2 * 12 + 2 * 144)
    assert stats_bytes(6, 6144, 0) > 900e6  # full-size whitening: about 0.9 GB
    assert stats_bytes(6, 6144, DEFAULT_PCA_DIM) < 25e6  # the default: tens of MB at most


def test_default_pca_dim_is_resolved_and_printed() -> None:
    assert resolve_pca_dim("domain-whiten", 6144, None)[0] == DEFAULT_PCA_DIM
    assert "--normalize-dim 0" in resolve_pca_dim("domain-whiten", 6144, None)[1]
    assert resolve_pca_dim("domain-whiten", 64, None) == (0, "")  # narrower than the default
    assert resolve_pca_dim("domain-center", 6144, None) == (0, "")
    assert resolve_pca_dim("domain-whiten", 6144, 0)[0] == 0
    assert resolve_pca_dim("domain-whiten", 6144, 9000)[0] == 0
    assert resolve_pca_dim("domain-whiten", 6144, 256) == (
        256, "shared PCA 6144 -> 256 dims before domain-whiten")
    with pytest.raises(CdirError, match="--normalize"):
        resolve_pca_dim("none", 6144, 256)
    with pytest.raises(CdirError):
        DomainNormalizer(pca_dim=-1)
