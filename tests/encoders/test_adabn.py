"""AdaBN (`ckpt:PATH?bn=domain`): the statistics estimator, per-domain embedding against a manual
AdaBN of the same model, re-embedding one domain when its images change (and after a run cut
short), search with the query domain's statistics or an inferred one, and bad specs."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cdir.core.errors import CdirError
from cdir.core.store import EmbeddingStore
from cdir.core.workspace import Workspace
from tests.helpers.cli import cdir
from tests.helpers.tiny_models import TINY_RESNET, write_tiny_encoder
from tests.helpers.trees import draw_shape, write_shape_tree

torch.set_num_threads(1)

CLASSES = ("circle", "square", "triangle", "cross", "ring")
DOMAINS = ("a", "b", "c")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(gallery root, workspace over 3 domains x 5 shapes x 2 images + one unreadable file in
    domain a, tiny encoder file); tests that change the gallery work on a copy."""
    parent = tmp_path_factory.mktemp("adabn")
    root = write_shape_tree(parent / "gallery", domains=DOMAINS, classes=CLASSES, per_class=2,
                            size=32, ext=".png", n_corrupt=1)
    ws = parent / "ws"
    assert cdir("data", "folder", root, "-w", ws) == 0
    return root, ws, write_tiny_encoder(parent / "enc.pt")


def _copy(made: tuple[Path, Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A fresh gallery and workspace of the same images (for tests that change them)."""
    root = write_shape_tree(tmp_path / "gallery", domains=DOMAINS, classes=CLASSES, per_class=2,
                            size=32, ext=".png", n_corrupt=1)
    ws = tmp_path / "ws"
    assert cdir("data", "folder", root, "-w", ws) == 0
    return root, ws


def _embed(ws: Path, spec: str, *flags: object) -> None:
    assert cdir("embed", "-w", ws, "--encoder", spec, "--workers", "0", "--no-progress",
                *flags) == 0


def _stored(ws: Path, spec: str) -> tuple[np.ndarray, np.ndarray]:
    w = Workspace(ws)
    return EmbeddingStore(w.embeddings_dir(spec)).load(w.manifest())


def _manual(ws: Path, enc_file: Path, domain: str) -> tuple[list[str], np.ndarray]:
    """(ids, vectors) of the readable images of ``domain`` by a hand-made AdaBN of the plain
    model: BN layers reset, cumulative, in train mode over the domain's images (one batch, as
    the embed stage's default batch size holds them all), then evaluated."""
    from cdir.core.images import load_image
    from encoders.image import load_image_encoder

    enc = load_image_encoder(f"ckpt:{enc_file}", device="cpu")
    m = Workspace(ws).manifest()
    ids, xs = [], []
    for id_, path, d in zip(m["id"], m["path"], m["domain"], strict=True):
        if d != domain:
            continue
        try:
            xs.append(enc.transform(load_image(path)))
        except Exception:  # noqa: BLE001 - the unreadable file
            continue
        ids.append(str(id_))
    x = torch.stack(xs)
    model = copy.deepcopy(enc.model)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
            mod.train()
    with torch.no_grad():
        model(x)
        model.eval()
        y = torch.nn.functional.normalize(model(x).flatten(1), dim=1)
    return ids, y.numpy()


def _rows(ws: Path, ids: list[str]) -> np.ndarray:
    m = Workspace(ws).manifest()
    pos = {str(i): j for j, i in enumerate(m["id"])}
    return np.array([pos[i] for i in ids])


# -- the estimator -------------------------------------------------------------------------------


def test_estimator_matches_a_hand_computation() -> None:
    from encoders.adabn import estimate_bn_stats, get_bn_stats, set_bn_stats
    from encoders.zoo.backbones import GridPooled, build_backbone

    torch.manual_seed(1)
    net, _ = build_backbone(TINY_RESNET["name"], **TINY_RESNET["kwargs"])
    net.eval()
    before = get_bn_stats(net)
    x1, x2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32) * 2 + 1
    stats = estimate_bn_stats(net, [x1])
    with torch.no_grad():
        h = net.conv1(x1)  # the first BN's input
    assert torch.allclose(stats["bn1.running_mean"], h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(stats["bn1.running_var"], h.var((0, 2, 3), unbiased=True), atol=1e-4)
    # side-effect free: the model's statistics, mode and momenta are as they were
    assert not net.training and all(not m.training and m.momentum == 0.1
                                    for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(torch.equal(before[k], v) for k, v in get_bn_stats(net).items())
    # cumulative over batches: the average of the batch statistics
    two = estimate_bn_stats(net, [x1, x2])
    with torch.no_grad():
        h2 = net.conv1(x2)
    assert torch.allclose(two["bn1.running_mean"], (h.mean((0, 2, 3)) + h2.mean((0, 2, 3))) / 2,
                          atol=1e-5)
    # a GridPooled model around the trunk: the same statistics under the trunk's names
    grid = GridPooled(net, 2).eval()
    gstats = estimate_bn_stats(grid, [x1])
    assert set(gstats) == {f"trunk.{k}" for k in stats}
    assert torch.allclose(gstats["trunk.bn1.running_mean"], stats["bn1.running_mean"])
    set_bn_stats(grid, gstats)
    assert torch.equal(net.bn1.running_mean, gstats["trunk.bn1.running_mean"])
    with pytest.raises(CdirError, match="do not fit"):
        set_bn_stats(net, gstats)


# -- embedding -----------------------------------------------------------------------------------


def test_each_domain_is_embedded_with_its_own_statistics(made, capsys) -> None:
    _, ws, enc = made
    spec, plain = f"ckpt:{enc}?bn=domain", f"ckpt:{enc}"
    capsys.readouterr()
    _embed(ws, spec)
    out = capsys.readouterr()
    assert "failed" in out.out and "zz_" in out.err  # the unreadable file, listed as today
    assert "BatchNorm statistics of a, b, c estimated" in out.out
    x, ok = _stored(ws, spec)
    for d in DOMAINS:
        ids, want = _manual(ws, enc, d)
        rows = _rows(ws, ids)
        assert ok[rows].all()
        np.testing.assert_allclose(x[rows], want, atol=1e-5)
    _embed(ws, plain)
    y, ok_plain = _stored(ws, plain)
    assert (ok == ok_plain).all() and not np.allclose(x[ok], y[ok], atol=1e-3)
    assert Workspace(ws).embeddings_dir(spec) != Workspace(ws).embeddings_dir(plain)
    capsys.readouterr()
    _embed(ws, spec)  # nothing changed: nothing re-estimated, nothing embedded
    assert "embedded 0 new" in capsys.readouterr().out


def test_a_changed_domain_is_reembedded_and_the_others_kept(made, tmp_path, capsys) -> None:
    from cdir.stages.domain_bn import load_stats
    from cdir.stages.modes import image_vectors

    root, ws = _copy(made, tmp_path)
    enc = made[2]
    spec = f"ckpt:{enc}?bn=domain"
    _embed(ws, spec)
    w = Workspace(ws)
    folder = w.embeddings_dir(spec)
    x0, _ = _stored(ws, spec)
    old = {str(i): v for i, v in zip(w.manifest()["id"], x0, strict=True)}
    stats0 = load_stats(folder)
    draw_shape("circle", "a", 7, 32).save(root / "a" / "circle" / "extra.png")
    assert cdir("data", "folder", root, "-w", ws) == 0
    m = w.manifest()
    dom = m["domain"].astype(str).to_numpy()
    capsys.readouterr()
    _embed(ws, spec)
    out = capsys.readouterr().out
    assert "embedded 11 new, 20 already done, 1 failed" in out
    assert "statistics of a estimated" in out
    x1, ok1 = _stored(ws, spec)
    for j, i in enumerate(m["id"].astype(str)):
        if dom[j] != "a" and ok1[j]:
            assert x1[j].tobytes() == old[i].tobytes()
    stats1 = load_stats(folder)
    assert all(torch.equal(stats1[d]["stats"][k], stats0[d]["stats"][k])
               for d in ("b", "c") for k in stats0[d]["stats"])
    ids, want = _manual(ws, enc, "a")
    np.testing.assert_allclose(x1[_rows(ws, ids)], want, atol=1e-5)  # no stale row served
    image_vectors(w, m, spec)  # the index stage takes them


def test_a_run_cut_short_leaves_no_row_with_other_statistics(made, tmp_path, capsys) -> None:
    from cdir.stages.modes import image_vectors

    root, ws = _copy(made, tmp_path)
    enc = made[2]
    spec = f"ckpt:{enc}?bn=domain"
    _embed(ws, spec)
    draw_shape("square", "a", 9, 32).save(root / "a" / "square" / "extra.png")
    assert cdir("data", "folder", root, "-w", ws) == 0
    w = Workspace(ws)
    # like a run killed after the new statistics and a first shard landed
    _embed(ws, spec, "--limit", 4, "--shard-rows", 2)
    with pytest.raises(CdirError, match="other BatchNorm statistics"):
        image_vectors(w, w.manifest(), spec)
    capsys.readouterr()
    _embed(ws, spec)
    out = capsys.readouterr().out
    # the limited run embedded 3 rows of a (and met the unreadable one) with the new statistics
    assert "embedded 8 new, 23 already done, 1 failed" in out and "estimated" not in out
    x, _ = _stored(ws, spec)
    ids, want = _manual(ws, enc, "a")
    np.testing.assert_allclose(x[_rows(ws, ids)], want, atol=1e-5)
    image_vectors(w, w.manifest(), spec)


def _search_json(capsys: pytest.CaptureFixture, ws: Path, flag: str, value: str, query: Path
                 ) -> tuple[dict, str]:
    """``cdir search -w WS FLAG VALUE --image QUERY --json`` on the CPU: the query's result and
    what went to stderr."""
    capsys.readouterr()
    assert cdir("search", "-w", ws, flag, value, "--image", query, "--json",
                "--device", "cpu") == 0
    out, err = capsys.readouterr()
    return json.loads(out)[0], err


# -- search --------------------------------------------------------------------------------------


def test_search_uses_the_query_domain_statistics(made, tmp_path, capsys) -> None:
    from cdir.core.images import load_image
    from cdir.stages.domain_bn import BN_FILE, load_stats, save_stats
    from cdir.stages.search import Searcher
    from encoders.image import load_image_encoder

    _, ws, enc = made
    spec = f"ckpt:{enc}?bn=domain"
    _embed(ws, spec)
    assert cdir("index", "build", "-w", ws, "--encoder", spec) == 0
    m = Workspace(ws).manifest()
    row = int(np.flatnonzero(m["domain"].astype(str).to_numpy() == "b")[3])
    query, qid = str(m["path"][row]), str(m["id"][row])
    s = Searcher(str(ws), encoder=spec, device="cpu")
    hits, _, used = s.search([load_image(query)], k=3, query_domain="b")
    assert used == ["b"] and hits[0][0].id == qid
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-5)

    # no query domain: the domain whose centroid is nearest to the query under its statistics
    x, ok = _stored(ws, spec)
    stats = load_stats(Workspace(ws).embeddings_dir(spec))
    plain = load_image_encoder(f"ckpt:{enc}", device="cpu")
    dom = m["domain"].astype(str).to_numpy()
    scores = {}
    for d in DOMAINS:
        c = x[ok & (dom == d)].mean(0)
        plain.use_bn_stats(stats[d]["stats"])
        scores[d] = float(plain.encode_images([load_image(query)])[0] @ (c / np.linalg.norm(c)))
    res, err = _search_json(capsys, ws, "--encoder", spec, query)
    assert res["query_domain"] == max(scores, key=scores.get) and res["query_domain_inferred"]
    assert f"bn=domain statistics as domain {res['query_domain']}" in err

    # a normalised index: the inferred domain also picks the query's normalisation
    assert cdir("index", "build", "-w", ws, "--encoder", spec, "--normalize",
                "domain-center") == 0
    name = next(p.stem for p in (ws / "indexes").glob("*.domain-center.faiss"))
    res, err = _search_json(capsys, ws, "--index", name, query)
    assert res["query_domain"] == max(scores, key=scores.get) and res["query_domain_inferred"]
    assert "bn=domain statistics and domain-center as domain" in err
    hits, _, used = Searcher(str(ws), index=name, device="cpu").search(
        [load_image(query)], k=1, query_domain="b")
    assert used == ["b"] and hits[0][0].id == qid
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-5)

    # statistics that no longer match the gallery are refused with the command to run
    folder = Workspace(ws).embeddings_dir(spec)
    keep = tmp_path / BN_FILE
    shutil.copy(folder / BN_FILE, keep)
    try:
        edited = load_stats(folder)
        edited["c"]["fingerprint"] = "0" * 16
        save_stats(folder, edited)
        with pytest.raises(CdirError, match=r"domain\(s\) c .*stale.*cdir embed"):
            Searcher(str(ws), index=name, device="cpu")
    finally:
        shutil.copy(keep, folder / BN_FILE)


# -- bad specs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("query, match", [
    ("?bn=batch", "bn takes only the value domain"),
    ("?bn=", "bn takes only the value domain"),
    ("?bn=domain&arch=resnet18", "bn=domain needs the backbone"),
    ("?bn=domain&features=head", "bn=domain needs the backbone"),
    (None, "not a timm model"),
])
def test_bad_specs_are_one_line(made, capsys, query, match) -> None:
    _, ws, enc = made
    spec = "ckpt:timm:resnet18?bn=domain" if query is None else f"ckpt:{enc}{query}"
    capsys.readouterr()
    assert cdir("embed", "-w", ws, "--encoder", spec, "--workers", "0", "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
