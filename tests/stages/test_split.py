"""The fixed dev/test split of a gallery's categories, and `cdir eval --split`."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cdir.galleries.splits import CATEGORY_SPLITS, category_split
from tests.helpers.cli import cdir, emoji_workspace


def test_category_split_is_a_function_of_the_name_alone():
    names = [f"u{cp:05x}_x" for cp in range(0x1F300, 0x1F300 + 400)]
    first = [category_split(n) for n in names]
    # the same names in another order, among others, keep their sides
    shuffled = names[::-1] + [f"extra_{i}" for i in range(50)]
    again = dict(zip(shuffled, (category_split(n) for n in shuffled), strict=True))
    assert [again[n] for n in names] == first
    assert set(first) == set(CATEGORY_SPLITS)
    assert 0.4 < first.count("dev") / len(first) < 0.6  # about half each


@pytest.fixture(scope="module")
def emoji_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = emoji_workspace(tmp_path_factory.mktemp("split"), 24)
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--no-progress") == 0
    return ws


def test_emoji_manifest_carries_the_category_split(emoji_ws: Path, tmp_path: Path):
    m = pd.read_parquet(emoji_ws / "manifest.parquet")
    assert set(m["split"]) == set(CATEGORY_SPLITS)
    assert (m["split"] == m["class_name"].map(category_split)).all()
    # one split per category, the same in every domain
    assert (m.groupby("class_name")["split"].nunique() == 1).all()
    # another selection of categories: each category's side is still its name's alone
    other = pd.read_parquet(emoji_workspace(tmp_path, 30) / "manifest.parquet")
    assert set(other["class_name"]) != set(m["class_name"])
    assert (other["split"] == other["class_name"].map(category_split)).all()


def test_eval_split_filters_queries_and_gallery(emoji_ws: Path, capsys):
    m = pd.read_parquet(emoji_ws / "manifest.parquet")
    out = {}
    for split in ("dev", "test", "all"):
        assert cdir("eval", "-w", emoji_ws, "--encoder", "pixels", "--split", split,
                    "--run", f"r_{split}", "--no-progress", "--examples", "0") == 0
        rows = json.loads((emoji_ws / "reports" / f"r_{split}" / "results.json").read_text())
        out[split] = rows
    captured = capsys.readouterr().out
    assert "[split test]" in captured and "[split dev]" in captured
    assert out["test"]["settings"]["split"] == "test"
    for split in ("dev", "test"):
        sub = m[m["split"] == split]
        per_domain = sub.groupby("domain").size().to_dict()
        pairs = [r for r in _rows(out[split]) if r["pair"] != "mean"]
        assert pairs, split
        for r in pairs:
            assert r["n_queries"] == per_domain[r["query_domain"]]
            assert r["n_gallery"] == per_domain[r["gallery_domain"]]
    all_pairs = [r for r in _rows(out["all"]) if r["pair"] != "mean"]
    assert all(r["n_queries"] == int((m["domain"] == r["query_domain"]).sum())
               for r in all_pairs)


def _rows(report: dict) -> list[dict]:
    return report["results"]


def test_eval_unknown_split_is_one_line(emoji_ws: Path, capsys):
    assert cdir("eval", "-w", emoji_ws, "--encoder", "pixels", "--split", "val") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dev" in err[0] and "test" in err[0], err


def test_one_relevant_item_per_query_is_said_and_recall_shown(emoji_ws: Path, capsys):
    # each emoji once per art set: every query has R = 1
    assert cdir("eval", "-w", emoji_ws, "--encoder", "pixels", "--split", "test", "--rerank",
                "none,csls", "--run", "r1", "--no-progress", "--examples", "0") == 0
    printed = capsys.readouterr().out
    note = "one relevant item per query: P@k = prec@1 = mAP@R; see recall@k"
    report = emoji_ws / "reports" / "r1"
    comparison = (report / "comparison.md").read_text()
    for text in (printed, comparison, (report / "visual" / "results.md").read_text()):
        assert note in text
    # the comparison shows P@1 once, then recall@k and mAP@All, not the equal P@5 and P@15
    heads = [line for line in comparison.splitlines() if line.startswith("### ")]
    assert heads == ["### P@1", "### recall@5", "### recall@15", "### mAP@All"]
    rows = _rows(json.loads((report / "visual" / "results.json").read_text()))
    mean = rows[-1]
    assert mean["P@1"] == mean["P@15"] == mean["prec@1"] == mean["mAP@R"]
    recall15 = comparison.split("### recall@15")[1].split("###")[0]
    assert f"| **mean** | {mean['recall@15']:.2f} |" in recall15
    assert mean["recall@15"] > mean["recall@1"]  # the column that still tells ranks apart
    assert "- recall@k is the fraction" in comparison
