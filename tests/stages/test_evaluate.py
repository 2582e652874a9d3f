"""The comparison of evaluated variants: one table per metric, a column per variant."""

from __future__ import annotations

from cdir.stages.evaluate import compare_modes, comparison_columns


def _rows(p1: float, r_max: int) -> list[dict]:
    pair = {"pair": "a→b", "n_queries": 3, "min_relevant": 1, "max_relevant": r_max,
            "P@1": p1, "P@5": p1 / 2, "recall@5": 80.0, "mAP@All": p1 / 3}
    mean = {**pair, "pair": "mean"}
    return [pair, mean]


def test_comparison_shows_p_at_k_and_map_all_per_variant():
    text = compare_modes({"visual": _rows(60.0, 4), "visual+csls": _rows(90.0, 4)}, (1, 5))
    heads = [line for line in text.splitlines() if line.startswith("### ")]
    assert heads == ["### P@1", "### P@5", "### mAP@All"]
    assert "| pair | visual | visual+csls |" in text
    assert "| a→b | 60.00 | 90.00 |" in text.split("### P@1")[1].split("###")[0]
    assert "| **mean** | 20.00 | 30.00 |" in text.split("### mAP@All")[1]
    assert "one relevant item per query" not in text
    assert "- P@k is the UCDIR precision: t = min(k, R)" in text  # the column notes


def test_comparison_columns_with_one_relevant_item():
    assert comparison_columns((1, 5, 15), one=True) == ["P@1", "recall@5", "recall@15", "mAP@All"]
    assert comparison_columns((5, 15), one=True) == ["P@1", "recall@5", "recall@15", "mAP@All"]
    assert comparison_columns((1, 5), one=False) == ["P@1", "P@5", "mAP@All"]
    text = compare_modes({"visual": _rows(60.0, 1)}, (1, 5))
    assert text.startswith("one relevant item per query: P@k = prec@1 = mAP@R; see recall@k")
    assert "### recall@5" in text and "### P@5" not in text
