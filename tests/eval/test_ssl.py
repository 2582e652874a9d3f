"""SSL evaluation: weighted kNN, retrieval P@1 and the linear probe, on features and on labelled
folders (with a module or a checkpoint path as the encoder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdir.core.errors import CdirError

torch.set_num_threads(1)


def _clusters(n_per: int, classes: int, dim: int, noise: float, seed: int):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    y = torch.arange(classes).repeat_interleave(n_per)
    x = centres[y] + noise * torch.randn(len(y), dim, generator=g)
    return x, y


def test_knn_classify_on_separable_clusters() -> None:
    from eval.ssl import knn_classify

    xtr, ytr = _clusters(30, 5, 16, 0.3, 0)
    xte, yte = _clusters(10, 5, 16, 0.3, 0)
    res = knn_classify(xtr, ytr, xte + 0.01, yte, k=20)
    assert res["top1"] == 100.0 and res["top5"] == 100.0
    # pure noise: chance level, so the high number above is not automatic
    noise = knn_classify(torch.randn(200, 16), torch.randint(0, 5, (200,)), k=20)
    assert noise["top1"] < 45.0


def test_knn_leave_one_out_excludes_the_query() -> None:
    from eval.ssl import knn_classify

    # every point is closest to a point of the *other* class; with itself counted, 1-NN would
    # score 100 %
    x = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.14, 0.99]])
    y = torch.tensor([0, 1, 0, 1])
    assert knn_classify(x, y, k=1)["top1"] == 0.0


def test_weighted_votes_break_a_count_tie() -> None:
    from eval.ssl import knn_classify

    train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    test = torch.tensor([[0.9, 0.1]])
    assert knn_classify(train, labels, test, torch.tensor([0]), k=2)["top1"] == 100.0
    assert knn_classify(train, labels, test, torch.tensor([1]), k=2)["top1"] == 0.0


def test_retrieval_p1_cross_domain() -> None:
    from eval.ssl import retrieval_p1

    # x = 3 * style(domain) + class one-hot: within a domain every image is nearest to another
    # class of the same style; across domains the same class wins
    style = {"A": [3.0, 0.0], "B": [0.0, 3.0]}
    y = [0, 1, 2, 0, 1, 2]
    dom = ["A"] * 3 + ["B"] * 3
    x = torch.tensor(
        [style[d] + [float(c == i) for i in range(3)] for d, c in zip(dom, y, strict=True)]
    )
    assert retrieval_p1(x, y) == 0.0
    assert retrieval_p1(x, y, dom) == 100.0  # a percentage, like the kNN accuracies


def test_linear_probe_features_learns_separable_classes() -> None:
    from eval.ssl import linear_probe_features

    xtr, ytr = _clusters(40, 6, 32, 0.5, 1)
    xte, yte = _clusters(15, 6, 32, 0.5, 1)
    xte = xte + 0.05 * torch.randn_like(xte)
    for mode in ("l2", "standardize", "none"):
        res = linear_probe_features(xtr, ytr, xte, yte, epochs=30, milestones=(20, 25),
                                    normalize=mode, lr=30.0 if mode == "l2" else 0.1)
        assert res["top1"] >= 95.0, (mode, res)
        assert res["best_top1"] >= res["top1"] and 1 <= res["best_epoch"] <= 30
    rand = linear_probe_features(torch.randn(120, 8), torch.randint(0, 6, (120,)),
                                 torch.randn(60, 8), torch.randint(0, 6, (60,)), epochs=10)
    assert rand["top1"] < 50.0


def test_stratified_split_keeps_every_class() -> None:
    from eval.ssl import stratified_split

    labels = [0] * 10 + [1] * 5 + [2] * 1
    tr, te = stratified_split(labels, 0.2, seed=3)
    assert sorted(tr + te) == list(range(16)) and not set(tr) & set(te)
    assert {labels[i] for i in tr} == {0, 1, 2}
    assert sum(labels[i] == 0 for i in te) == 2 and sum(labels[i] == 1 for i in te) == 1
    assert (tr, te) == stratified_split(labels, 0.2, seed=3)
    with pytest.raises(CdirError):
        stratified_split(labels, 1.5)


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An easy labelled set in the gallery layout root/<domain>/<class>/<img>: 4 classes by colour,
    2 domains by background shade, 10 images per class and domain."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
               "yellow": (230, 220, 30)}
    for domain, bg in (("light", 240), ("dark", 200)):
        for name, col in colours.items():
            d = root / domain / name
            d.mkdir(parents=True)
            for i in range(10):
                a = np.full((32, 32, 3), bg, dtype=np.float64)
                x0, y0 = rng.integers(0, 8, 2)
                a[y0:y0 + 24, x0:x0 + 24] = col
                a = np.clip(a + rng.normal(0, 10, a.shape), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.png")
    (root / "light" / "red" / "broken.png").write_bytes(b"\x89PNG broken")
    return root


def _encoder() -> torch.nn.Module:
    from encoders.zoo.backbones import build_backbone

    torch.manual_seed(0)
    model, _ = build_backbone("cifar_resnet18", width=0.25)
    return model


PREP = {"size": 32, "eval_resize": 1.0}


def test_labelled_set_layouts(shapes_folder: Path, tmp_path: Path) -> None:
    import pandas as pd

    from encoders.ssl.data import labelled_set

    s = labelled_set(shapes_folder)
    assert s.class_names == ["blue", "green", "red", "yellow"] and len(s) == 81
    assert set(s.domains) == {"light", "dark"}
    flat = labelled_set(shapes_folder / "dark")
    assert flat.domains is None and len(flat) == 40
    df = pd.DataFrame({"path": s.paths, "label": s.labels, "domain": s.domains,
                       "class_name": [s.class_names[i] for i in s.labels]})
    df.to_parquet(tmp_path / "m.parquet")
    m = labelled_set(tmp_path / "m.parquet")
    assert m.labels == s.labels and m.class_names == s.class_names and m.domains == s.domains
    with pytest.raises(CdirError, match="depths"):
        (tmp_path / "mixed" / "a").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "mixed" / "top.png")
        Image.new("RGB", (4, 4)).save(tmp_path / "mixed" / "a" / "x.png")
        labelled_set(tmp_path / "mixed")


def test_knn_eval_and_linear_probe_on_a_folder(shapes_folder: Path) -> None:
    """Even a random-weight CNN separates colours; the unreadable file is dropped, not fatal."""
    from eval.ssl import knn_eval, linear_probe

    enc = _encoder()
    knn = knn_eval(enc, shapes_folder, preprocess=PREP, progress=False)
    assert knn["n_train"] == 80 and knn["leave_one_out"] and knn["p1_cross_domain"]
    assert knn["knn"]["k20"]["top1"] >= 90.0 and knn["knn"]["k1"]["top1"] >= 90.0
    lin = linear_probe(enc, shapes_folder, preprocess=PREP, progress=False)  # MoCo defaults
    assert lin["n_train"] + lin["n_test"] == 80 and lin["classes"] == 4
    assert lin["top1"] >= 90.0
    # an explicit test folder with the same classes
    res = knn_eval(enc, shapes_folder / "light", shapes_folder / "dark", preprocess=PREP,
                   progress=False, k=(5,))
    assert res["n_test"] == 40 and not res["leave_one_out"] and "k5" in res["knn"]


def test_evaluation_from_a_checkpoint_path(shapes_folder: Path, tmp_path: Path) -> None:
    """An exported encoder file carries its preprocessing: the path alone is enough."""
    from cdir.cli import main
    from eval.ssl import knn_eval

    enc = _encoder()
    torch.save({"version": 1, "method": "moco", "encoder": enc.state_dict(),
                "encoder_arch": {"name": "cifar_resnet18", "kwargs": {"width": 0.25}},
                "config": {"aug": {"size": 32, "eval_resize": 1.0}}}, tmp_path / "enc.pt")
    a = knn_eval(tmp_path / "enc.pt", shapes_folder, progress=False)
    b = knn_eval(enc, shapes_folder, preprocess=PREP, progress=False)
    assert a["knn"] == b["knn"] and a["p1"] == b["p1"]
    out = tmp_path / "res.json"
    assert main(["eval", "knn", "--encoder", f"ckpt:{tmp_path / 'enc.pt'}", "--data",
                 str(shapes_folder), "--json", str(out)]) == 0
    # P@1 is a percentage like the kNN accuracies (colours separate: far above 1)
    saved = json.loads(out.read_text())["knn"]
    assert saved["p1"] == pytest.approx(a["p1"]) and 10.0 < saved["p1"] <= 100.0
