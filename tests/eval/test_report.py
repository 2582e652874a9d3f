"""Report files: tables, heatmap and the retrieval gallery, from a real (tiny) evaluation."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from eval.protocol import evaluate_pairs
from eval.report import format_table, format_value, jsonable, write_report
from eval.topk import CosineScorer

torch.set_num_threads(1)


def _gallery(tmp_path) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(0)
    rows, vecs = [], []
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    for d in ("photo", "sketch", "art"):
        for c, rgb in colours.items():
            for i in range(3):
                p = tmp_path / "img" / d / c / f"{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40 + 10 * i, 30), rgb).save(p)
                rows.append({"id": f"{d}/{c}/{i}.png", "path": str(p), "domain": d,
                             "class_name": c, "split": "all"})
                v = np.array([1.0, 0.0] if c == "red" else [0.0, 1.0]) + 1.5 * rng.random(2)
                vecs.append(v / np.linalg.norm(v))
    df = pd.DataFrame(rows)
    df["label"] = (df["class_name"] == "red").astype(int)  # blue=0, red=1 (byte-sorted names)
    rows[0]["path"] = str(tmp_path / "missing.png")  # one unreadable image: a placeholder tile
    df.loc[0, "path"] = rows[0]["path"]
    return df, np.asarray(vecs, dtype=np.float32)


def test_write_report_writes_every_file(tmp_path):
    df, vecs = _gallery(tmp_path)
    res = evaluate_pairs(CosineScorer(vecs, device="cpu"), df, ks=(1, 3), keep_examples=2,
                         progress=False)
    paths = write_report(res, tmp_path / "report", "tiny | test", manifest=df)
    assert set(paths) == {"md", "csv", "json", "heatmap", "gallery_png", "gallery_html"}
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0
    assert not list((tmp_path / "report").glob(".*.tmp"))  # no temp files left behind

    pairs = [r["pair"] for r in res if r["pair"] != "mean"]
    assert len(pairs) == 6
    md = paths["md"].read_text(encoding="utf-8")
    assert md.startswith("# tiny | test")
    for pair in pairs:
        assert f"| {pair} |" in md
    assert "| **mean** |" in md and "P@1" in md and "mAP@R" in md

    with open(paths["csv"], newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [r["pair"] for r in table] == pairs + ["mean"]
    assert float(table[0]["P@1"]) == res[0]["P@1"]

    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data["title"] == "tiny | test"
    assert [r["pair"] for r in data["results"]] == pairs + ["mean"]
    assert all("examples" not in r for r in data["results"])
    assert len(data["examples"]) == 12

    with Image.open(paths["heatmap"]) as im:
        assert im.width > 100 and im.height > 100
    with Image.open(paths["gallery_png"]) as im:
        assert im.height > 12 * 112  # one strip per example query
        px = np.asarray(im.convert("RGB"))
    assert ((px == (46, 160, 67)).all(axis=2)).sum() > 100  # green frames of hits
    html = paths["gallery_html"].read_text(encoding="utf-8")
    assert html.count("data:image/jpeg;base64,") == 12 * 4  # query + top 3, embedded
    assert 'class="hit"' in html and "photo→sketch" in html


def test_report_without_examples_and_with_nan(tmp_path):
    res = [{"pair": "x→y", "query_domain": "x", "gallery_domain": "y", "n_queries": 2,
            "n_gallery": 3, "P@1": float("nan"), "mAP@R": 12.5},
           {"pair": "mean", "query_domain": "", "gallery_domain": "", "n_queries": 2,
            "n_gallery": None, "P@1": float("nan"), "mAP@R": 12.5}]
    paths = write_report(res, tmp_path, "nan")
    assert set(paths) == {"md", "csv", "json", "heatmap"}
    assert json.loads(paths["json"].read_text())["results"][0]["P@1"] is None
    table = format_table(res)
    assert "| x→y | 2 | 3 | n/a | 12.50 |" in table
    assert table.splitlines()[0] == "| pair | n_queries | n_gallery | P@1 | mAP@R |"
    assert [format_value(v) for v in (None, float("nan"), 1 / 3, 7, "x")] == [
        "", "n/a", "0.33", "7", "x"]
    assert jsonable({"a": np.float64("nan"), "b": (np.int64(3), [np.float32(0.5)])}) == {
        "a": None, "b": [3, [0.5]]}


def test_results_md_explains_recall_at_k(tmp_path):
    """recall@k is the fraction of the relevant items found: results.md says so."""
    res = [{"pair": "x→y", "query_domain": "x", "gallery_domain": "y", "n_queries": 2,
            "n_gallery": 3, "recall@5": 40.0}]
    md = " ".join(write_report(res, tmp_path, "recall")["md"].read_text().split())
    assert "recall@k is the fraction of the relevant gallery items found in the top k" in md


def test_tables_say_when_every_query_has_one_relevant_item(tmp_path):
    note = "one relevant item per query: P@k = prec@1 = mAP@R; see recall@k"
    row = {"pair": "x→y", "query_domain": "x", "gallery_domain": "y", "n_queries": 2,
           "n_gallery": 3, "min_relevant": 1, "max_relevant": 1, "P@1": 50.0, "P@5": 50.0,
           "recall@5": 100.0, "mAP@All": 75.0}
    table = format_table([row])
    assert table.rstrip().endswith(note)
    assert "max_relevant" not in table.splitlines()[0]  # the R range is not a metric column
    md = write_report([row], tmp_path, "r1")["md"].read_text()
    assert note in md and "- mAP@All is the average precision over the whole ranked gallery" in md
    # one query with R = 2 (or R = 0) and the note is gone
    assert note not in format_table([{**row, "max_relevant": 2}])
    assert note not in format_table([{**row, "min_relevant": 0}])


def test_seeds_are_aggregated_as_mean_and_sample_std():
    from eval.report import aggregate_seeds, format_seed_table

    def rows(p1: float, m: float) -> list[dict]:
        return [{"pair": "x→y", "n_queries": 2, "P@1": p1, "mAP@All": m},
                {"pair": "mean", "n_queries": 2, "P@1": p1, "mAP@All": float("nan")}]

    agg = aggregate_seeds([rows(50.0, 10.0), rows(70.0, 20.0), rows(60.0, 30.0)])
    assert [r["pair"] for r in agg] == ["x→y", "mean"] and agg[0]["seeds"] == 3
    assert agg[0]["P@1"] == pytest.approx(60.0) and agg[0]["P@1 std"] == pytest.approx(10.0)
    assert agg[0]["mAP@All"] == pytest.approx(20.0)
    assert np.isnan(agg[1]["mAP@All"])
    table = format_seed_table(agg, ["P@1", "mAP@All"])
    assert "| x→y | 60.00 ± 10.00 | 20.00 ± 10.00 |" in table
    assert "| **mean** | 60.00 ± 10.00 | n/a |" in table
    assert aggregate_seeds([rows(50.0, 10.0)])[0]["P@1 std"] == 0.0  # one seed: no spread


def _gallery_html(tmp_path, k: int = 10) -> str:
    """The gallery.html of a report whose example queries show their top ``k``."""
    df, vecs = _gallery(tmp_path)
    df = pd.concat([df] * 2, ignore_index=True)  # enough gallery images for a top 10
    df["id"] = [f"{i}-{x}" for i, x in enumerate(df["id"])]
    vecs = np.concatenate([vecs] * 2)
    res = evaluate_pairs(CosineScorer(vecs, device="cpu"), df, ks=(1, k), keep_examples=1,
                         progress=False)
    paths = write_report(res, tmp_path / "report", "wide", manifest=df)
    return paths["gallery_html"].read_text(encoding="utf-8")


def test_gallery_rows_never_wrap_a_result_under_the_query(tmp_path):
    import re

    html = _gallery_html(tmp_path)
    rules = dict(re.findall(r"(?m)^([.\w][^{\n]*)\{([^}]*)\}", html.split("</style>")[0]))
    row = dict(d.split(":", 1) for d in rules[".row"].split(";") if d)
    figure = dict(d.split(":", 1) for d in rules["figure"].split(";") if d)
    assert row["display"] == "flex" and row["flex-wrap"] == "nowrap"
    assert row["overflow-x"] == "auto"  # a narrow window scrolls the row sideways
    assert figure["flex"] == "none"  # tiles keep their size instead of shrinking
    first = html.split('<div class="row">')[1].split("</div>")[0]
    assert first.count("<figure") == 11  # the query and its 10 results, in one row


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium on PATH")
def test_gallery_row_of_ten_results_stays_on_one_line_at_1400px(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    page_file = tmp_path / "gallery.html"
    page_file.write_text(_gallery_html(tmp_path), encoding="utf-8")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(page_file.as_uri())
        tops = page.evaluate("() => [...document.querySelector('.row').children]"
                             ".map(f => f.offsetTop)")
        browser.close()
    assert len(tops) == 11 and len(set(tops)) == 1, tops
