"""Search-time per-domain normalisation and CSLS through the command line: `cdir index build
--normalize`, `cdir search --query-domain`, `cdir eval --normalize/--rerank`, on a small emoji
workspace with the cheap `pixels` encoder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cdir.core.images import load_image
from cdir.core.store import EmbeddingStore
from cdir.core.workspace import Workspace
from indexes.meta import index_files, normalizer_file, read_meta
from indexes.normalize import DomainNormalizer, csls_scores, csls_terms
from tests.helpers.cli import cdir, emoji_workspace
from tests.helpers.trees import write_shape_tree

torch.set_num_threads(1)
WHITE = "domain-whiten"


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    ws = emoji_workspace(tmp_path_factory.mktemp("norm"), 20)
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0", "--no-progress") == 0
    return ws


def _build(ws: Path, capsys, *flags: str) -> str:
    capsys.readouterr()
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels", *flags) == 0
    captured = capsys.readouterr()
    return captured.out + captured.err


def _name(ws: Path) -> str:
    return next(p.name.removesuffix(".faiss") for p in (ws / "indexes").glob(f"*.{WHITE}.faiss"))


def _search(ws: Path, capsys, query: Path, *flags: str) -> tuple[dict, str]:
    capsys.readouterr()
    assert cdir("search", "-w", ws, "--index", _name(ws), "--image", query, "-k", "8",
                "--json", *flags) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out)[0], captured.err


def _expected(ws: Path, query: Path, domain: str) -> list[str]:
    """The top 8 ids by cosine of the query's stored vector, transformed as of ``domain``,
    against the gallery vectors transformed with their own domains: the gallery-side transform."""
    w = Workspace(ws)
    m = w.manifest()
    x, ok = EmbeddingStore(next((ws / "embeddings").iterdir())).load(m)
    norm = DomainNormalizer.load(normalizer_file(ws / "indexes" / _name(ws)))
    dom = m["domain"].astype(str).to_numpy()
    z = norm.transform(x[ok], dom[ok])
    row = int(np.flatnonzero(m["path"].astype(str).to_numpy() == str(query))[0])
    zq, _ = norm.transform_query(x[row], domain)
    order = np.argsort(-(z @ zq), kind="stable")[:8]
    return m["id"].astype(str).to_numpy()[ok][order].tolist()


def test_build_writes_stats_and_search_uses_the_gallery_transform(ws, capsys):
    out = _build(ws, capsys, "--normalize", WHITE)
    assert f".flat.{WHITE}" in out and "built flat index" in out
    _build(ws, capsys)  # the plain index keeps its own name beside it
    path = ws / "indexes" / _name(ws)
    stats = normalizer_file(path)
    meta = read_meta(path)
    assert meta.normalize == WHITE and stats.exists() and index_files(path).faiss.exists()
    assert meta.normalize_fingerprint == DomainNormalizer.load(stats).fingerprint
    assert read_meta(ws / "indexes" / _name(ws).removesuffix(f".{WHITE}")).normalize == "none"
    assert "up to date" in _build(ws, capsys, "--normalize", WHITE)

    query = sorted((ws / "gallery" / "twemoji").rglob("*.png"))[3]
    res, err = _search(ws, capsys, query, "--query-domain", "twemoji")
    assert res["query_domain"] == "twemoji" and not res["query_domain_inferred"] and not err
    ids = [h["id"] for h in res["results"]]
    assert ids == _expected(ws, query, "twemoji")
    assert res["results"][0]["path"] == str(query)
    assert res["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    # without --query-domain: the nearest centroid's domain, named on stderr and in the result
    res, err = _search(ws, capsys, query)
    used = res["query_domain"]
    assert res["query_domain_inferred"] and f"as domain {used}" in err
    assert [h["id"] for h in res["results"]] == _expected(ws, query, used)


def test_changed_stats_are_refused_then_refit(ws, capsys):
    _build(ws, capsys, "--normalize", WHITE)
    stats = normalizer_file(ws / "indexes" / _name(ws))
    query = next((ws / "gallery" / "openmoji").rglob("*.png"))

    def refused(match: str) -> None:
        capsys.readouterr()
        assert cdir("search", "-w", ws, "--index", _name(ws), "--image", query) == 2
        err = capsys.readouterr().err
        assert match in err and f"--normalize {WHITE}" in err and "cdir index build" in err

    # statistics refit on other vectors (a consistent file, not the sidecar's)
    norm = DomainNormalizer.load(stats)
    state = norm.to_state()
    other = DomainNormalizer(WHITE).fit(np.random.default_rng(0).normal(
        size=(60, norm.dim)).astype(np.float32), np.repeat(norm.domains, 20))
    other.save(stats)
    refused("not those index")
    assert "missing or changed: refit" in _build(ws, capsys, "--normalize", WHITE)
    assert DomainNormalizer.load(stats).fingerprint == state["fingerprint"]
    # a hand-edited file
    state["means"] = state["means"] + 1.0
    with open(stats, "wb") as f:
        np.savez(f, **state)
    refused("fingerprint")
    _build(ws, capsys, "--normalize", WHITE)
    stats.unlink()
    refused("missing")
    assert "built flat index" in _build(ws, capsys, "--normalize", WHITE)
    # another normalisation under this name is another index
    capsys.readouterr()
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--normalize",
                "domain-center", "--name", _name(ws)) == 2
    assert "--force" in capsys.readouterr().err


def test_grown_gallery_is_refit_not_extended(tmp_path, capsys):
    root = write_shape_tree(tmp_path / "g", domains=("a", "b"), classes=("circle", "square"),
                            per_class=6)
    ws = tmp_path / "ws"
    assert cdir("data", "folder", root, "-w", ws) == 0
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0", "--no-progress") == 0
    _build(ws, capsys, "--normalize", "domain-center")
    _build(ws, capsys)
    write_shape_tree(root, domains=("a", "b"), classes=("circle", "square", "triangle"),
                     per_class=6)
    assert cdir("data", "folder", root, "-w", ws) == 0
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0", "--no-progress") == 0
    out = _build(ws, capsys, "--normalize", "domain-center")
    assert "the gallery grew: the domain-center statistics" in out
    assert "built flat index" in out and "36 vectors" in out
    assert "added 12 vectors" in _build(ws, capsys)  # the plain index still grows in place


def test_a_domain_too_small_for_its_own_statistics_is_named(tmp_path, capsys):
    root = write_shape_tree(tmp_path / "g", domains=("a", "b"), classes=("circle", "square"),
                            per_class=6)
    for f in sorted((root / "b").rglob("*.jpg"))[1:]:
        f.unlink()  # domain b keeps one image
    ws = tmp_path / "ws"
    assert cdir("data", "folder", root, "-w", ws) == 0
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0", "--no-progress") == 0
    out = _build(ws, capsys, "--normalize", "domain-whiten")
    assert "statistics of their own: b (1 image); the statistics pooled" in out
    assert "a (12" not in out and "built flat index" in out  # a has its own


def _report(out: str) -> Path:
    return Path(re.search(r"report in (\S+)", out).group(1))


def _mean(report: Path, key: str) -> dict:
    return json.loads((report / key / "results.json").read_text())["results"][-1]


def test_eval_side_by_side_and_csls(ws, capsys):
    common = ("eval", "-w", ws, "--encoder", "pixels", "--examples", "0", "--no-progress",
              "--ks", "1,5")
    capsys.readouterr()
    assert cdir(*common, "--normalize", f"none,{WHITE}") == 0
    out = capsys.readouterr().out
    assert "### P@1" in out and f"| pair | visual | visual+{WHITE} |" in out
    norm_report = _report(out)
    assert "normalize" in norm_report.name
    plain, white = _mean(norm_report, "visual"), _mean(norm_report, f"visual+{WHITE}")
    assert (norm_report / "comparison.md").exists() and plain["P@1"] != white["P@1"]

    assert cdir(*common, "--rerank", "none,csls", "--csls-k", "5") == 0
    out = capsys.readouterr().out
    csls_report = _report(out)
    assert csls_report != norm_report and "rerank" in csls_report.name
    assert "(CSLS k=5)" in out
    plain2, csls = _mean(csls_report, "visual"), _mean(csls_report, "visual+csls")
    assert plain2["P@1"] == pytest.approx(plain["P@1"])  # the plain column is the same run
    assert any(plain2[k] != csls[k] for k in ("P@1", "P@5", "mAP@R"))


def test_csls_scorer_matches_the_dense_formula():
    from eval.rerank import CSLSScorer
    from eval.topk import CosineScorer

    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 6)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dom = np.repeat(["a", "b", "c"], 10)
    scorer = CSLSScorer(CosineScorer(x), dom, k=3)
    q_rows, g_rows = np.arange(2, 7), np.arange(10, 20)  # part of a's queries against b
    r_q, r_g = csls_terms(x[:10], x[10:20], 3)
    want = csls_scores(x[q_rows], x[g_rows], r_q[q_rows], r_g)
    np.testing.assert_allclose(scorer.scores(q_rows, g_rows).numpy(), want, atol=1e-5)
    mixed = np.array([3, 12, 25])  # a block of several query domains: each with its r-terms
    got = scorer.scores(mixed, g_rows).numpy()
    for i, row in enumerate(mixed):
        d = slice(10 * (row // 10), 10 * (row // 10) + 10)
        r_q, r_g = csls_terms(x[d], x[10:20], 3)
        np.testing.assert_allclose(got[i], csls_scores(x[[row]], x[g_rows],
                                                       r_q[[row % 10]], r_g)[0], atol=1e-5)


@pytest.mark.parametrize("args, match", [
    (("index", "build", "-w", "WS", "--encoder", "pixels", "--normalize", "magic"),
     "--normalize"),
    (("eval", "-w", "WS", "--encoder", "pixels", "--normalize", "none,magic"), "--normalize"),
    (("eval", "-w", "WS", "--encoder", "pixels", "--rerank", "foo"), "--rerank"),
    (("eval", "-w", "WS", "--encoder", "pixels", "--csls-k", "0"), "--csls-k"),
    (("eval", "-w", "WS", "--encoder", "pixels", "--normalize-dim", "-1"), "--normalize-dim"),
    (("index", "build", "-w", "WS", "--encoder", "pixels", "--normalize-dim", "8"),
     "--normalize-dim"),
])
def test_bad_values_one_line_exit_2(ws, capsys, args, match):
    capsys.readouterr()
    try:
        rc = cdir(*(ws if a == "WS" else a for a in args))
    except SystemExit as e:  # argparse refuses a bad choice itself
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and match in errors[0] and "Traceback" not in err, err


def test_bad_query_domain(ws, capsys):
    _build(ws, capsys, "--normalize", WHITE)
    query = next((ws / "gallery" / "twemoji").rglob("*.png"))
    assert cdir("search", "-w", ws, "--index", _name(ws), "--image", query,
                "--query-domain", "nope") == 2
    err = capsys.readouterr().err
    assert "unknown query domain 'nope'" in err and len(err.strip().splitlines()) == 1


def test_demo_query_domain(ws, capsys, tmp_path):
    """The demo on a whitened index: a new image normalised as the domain given, or as that of
    the nearest gallery centroid."""
    from app.backend import ALL_DOMAINS, DETECT, DemoBackend, Query

    _build(ws, capsys, "--normalize", WHITE)
    backend = DemoBackend(ws)
    query = tmp_path / "new.png"
    load_image(sorted((ws / "gallery" / "twemoji").rglob("*.png"))[3]).rotate(5).save(query)
    a = backend.search(Query(path=str(query)), "visual", _name(ws), None, ALL_DOMAINS, 3,
                       "twemoji")
    assert not a.error and a.query_domain == "twemoji" and "(given)" in a.message, a.message
    b = backend.search(Query(path=str(query)), "visual", _name(ws), None, ALL_DOMAINS, 3, DETECT)
    assert "(nearest centroid)" in b.message and WHITE in b.message, b.message


def test_normalize_dim_build_search_info_and_refit(ws, capsys, tmp_path):
    """--normalize-dim: a shared PCA before the per-domain whitening; the choice and the
    statistics' size printed at build time and by `index info`; a search (command line and
    demo) of encoder-width queries against the narrower index; another dim is a rebuild."""
    from app.backend import ALL_DOMAINS, DemoBackend, Query

    out = _build(ws, capsys, "--normalize", WHITE, "--normalize-dim", "8", "--rebuild")
    assert "shared PCA 1024 -> 8 dims before domain-whiten" in out
    path = ws / "indexes" / _name(ws)
    stats = normalizer_file(path)
    size = stats.stat().st_size
    assert f"statistics: {size / 1e3:.1f} kB (1024 -> 8 dims, 3 domains)" in out
    assert read_meta(path).dim == 8 and DomainNormalizer.load(stats).out_dim == 8
    capsys.readouterr()
    assert cdir("index", "info", "-w", ws) == 0
    info = capsys.readouterr().out
    assert f"(dim 8, {WHITE} after a shared PCA to 8, statistics {size / 1e6:.1f} MB)" in info
    assert read_meta(path).normalize_dim == 8

    query = sorted((ws / "gallery" / "twemoji").rglob("*.png"))[3]
    res, _ = _search(ws, capsys, query, "--query-domain", "twemoji")
    assert [h["id"] for h in res["results"]] == _expected(ws, query, "twemoji")
    new = tmp_path / "new.png"
    load_image(query).rotate(5).save(new)
    got = DemoBackend(ws).search(Query(path=str(new)), "visual", _name(ws), None, ALL_DOMAINS,
                                 3, "twemoji")
    assert not got.error, got.message

    out = _build(ws, capsys, "--normalize", WHITE, "--normalize-dim", "8")
    assert "up to date" in out and f"statistics: {size / 1e3:.1f} kB" in out
    out = _build(ws, capsys, "--normalize", WHITE, "--normalize-dim", "16")
    assert "built flat index" in out and "not a shared PCA to 16 dims: rebuilt" in out
    assert read_meta(path).dim == 16
    stats.unlink()
    capsys.readouterr()
    assert cdir("search", "-w", ws, "--index", _name(ws), "--image", query) == 2
    err = capsys.readouterr().err  # the rebuild it names keeps the PCA
    assert "missing" in err and f"--normalize {WHITE} --normalize-dim 16" in err
    out = _build(ws, capsys, "--normalize", WHITE, "--normalize-dim", "16")
    assert "missing or changed: refit" in out and read_meta(path).dim == 16
    # the default on 1,024-d pixels: the shared PCA, named at build time
    out = _build(ws, capsys, "--normalize", WHITE)
    assert "(the default; --normalize-dim 0 keeps all 1024)" in out
    assert "shared PCA 1024 -> 512" in out


def test_eval_normalize_dim_scores_the_projected_whitening(ws, capsys):
    """`cdir eval --normalize-dim N` scores what an index built with the same N serves: the
    shared PCA fitted on the evaluated rows, then the per-domain whitening."""
    from cdir.stages.evaluate import mean_pair_p1

    capsys.readouterr()
    assert cdir("eval", "-w", ws, "--encoder", "pixels", "--examples", "0", "--no-progress",
                "--ks", "1", "--normalize", WHITE, "--normalize-dim", "8") == 0
    report = _report(capsys.readouterr().out)
    got = json.loads((report / "results.json").read_text())
    assert got["settings"]["normalize_dim"] == "8"
    m = Workspace(ws).manifest()
    x, ok = EmbeddingStore(next((ws / "embeddings").iterdir())).load(m)
    dom = m["domain"].astype(str).to_numpy()[ok]
    z = DomainNormalizer(WHITE, pca_dim=8).fit(x[ok], dom).transform(x[ok], dom)
    want = mean_pair_p1(z, m["label"].to_numpy()[ok], dom, "none")
    assert got["results"][-1]["P@1"] == pytest.approx(want)
