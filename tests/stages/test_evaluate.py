"""The comparison of evaluated variants: one table per metric, a column per variant."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from cdir.stages.evaluate import compare_modes, comparison_columns
from tests.helpers.cli import cdir, emoji_workspace


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


# -- over seeds ----------------------------------------------------------------------------------

def _checkpoint(path: Path, seed: int) -> Path:
    """A tiny exported encoder, as one seed's training run would leave it."""
    import torch

    from encoders.zoo.backbones import build_backbone

    torch.manual_seed(seed)
    net, _ = build_backbone("cifar_resnet18", width=0.25)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"version": 1, "method": "moco", "encoder": net.state_dict(),
                "encoder_arch": {"name": "cifar_resnet18", "kwargs": {"width": 0.25}},
                "config": {"aug": {"size": 32, "eval_resize": 1.0}}}, path)
    return path


def test_eval_over_seeds_gives_mean_and_std(tmp_path: Path, capsys):
    ws = emoji_workspace(tmp_path, 6)
    for seed in (0, 1):
        ckpt = _checkpoint(tmp_path / f"seed_{seed}" / "enc.pt", seed)
        assert cdir("embed", "-w", ws, "--encoder", f"ckpt:{ckpt}", "--no-progress") == 0
    spec = f"ckpt:{tmp_path}/seed_{{seed}}/enc.pt"
    capsys.readouterr()
    assert cdir("eval", "-w", ws, "--encoder", spec, "--seeds", "0", "1", "--run", "s",
                "--examples", "0", "--no-progress") == 0
    out = capsys.readouterr().out
    report = ws / "reports" / "s"
    per_seed = [json.loads((report / f"seed_{s}" / "results.json").read_text())["results"]
                for s in (0, 1)]
    assert per_seed[0] != per_seed[1]  # two different models were evaluated
    agg = json.loads((report / "seeds.json").read_text())
    assert agg["seeds"] == [0, 1] and agg["models"]["encoder"] == spec
    (mean,) = [r for r in agg["results"]["visual"] if r["pair"] == "mean"]
    for col in ("P@1", "mAP@All", "recall@5"):
        a, b = per_seed[0][-1][col], per_seed[1][-1][col]
        assert mean[col] == pytest.approx((a + b) / 2)
        assert mean[f"{col} std"] == pytest.approx(statistics.stdev([a, b]))
    md = (report / "seeds.md").read_text()
    assert f"{mean['mAP@All']:.2f} ± {mean['mAP@All std']:.2f}" in md
    assert "over seeds" in out and "±" in out

    # nothing to vary, or a seed twice: one line, exit 2
    for args, match in ((("--encoder", "pixels", "--seeds", "0", "1"), "{seed}"),
                        (("--encoder", spec, "--seeds", "1", "1"), "repeats")):
        capsys.readouterr()
        assert cdir("eval", "-w", ws, *args, "--no-progress") == 2
        assert match in capsys.readouterr().err


def test_a_retrained_checkpoint_gets_its_own_report_with_its_weights_hash(tmp_path: Path,
                                                                          capsys):
    from cdir.core.io import sha256_file

    ws = emoji_workspace(tmp_path, 6)
    ckpt = tmp_path / "run" / "enc.pt"

    def evaluate() -> tuple[Path, str]:
        assert cdir("embed", "-w", ws, "--encoder", f"ckpt:{ckpt}", "--no-progress") == 0
        capsys.readouterr()
        assert cdir("eval", "-w", ws, "--encoder", f"ckpt:{ckpt}", "--examples", "0",
                    "--no-progress") == 0
        report = Path(capsys.readouterr().out.strip().splitlines()[-1].rsplit("report in ", 1)[1])
        return report, (report / "results.md").read_text()

    _checkpoint(ckpt, 0)
    first, first_md = evaluate()
    digest = f"sha256:{sha256_file(ckpt)[:16]}"
    assert f"- encoder_weights: {digest}\n" in first_md
    settings = json.loads((first / "results.json").read_text())["settings"]
    assert settings["encoder_weights"] == digest

    ckpt.unlink()  # retrained at the same path
    _checkpoint(ckpt, 1)
    second, second_md = evaluate()
    assert second != first
    assert f"- encoder_weights: sha256:{sha256_file(ckpt)[:16]}\n" in second_md
    assert (first / "results.md").read_text() == first_md  # the old report is kept
