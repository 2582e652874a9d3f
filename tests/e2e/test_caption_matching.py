"""Caption-Matching end to end on the emoji gallery, offline: a tiny captioner built from a config,
the real all-MiniLM-L6-v2 (shipped in a PyPI package) as text encoder, a tiny CLIP for cm-image,
every retrieval mode through `cdir eval`, and query captioning at search time."""

import csv
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.helpers.cli import cdir, emoji_workspace
from tests.helpers.tiny_models import tiny_model_path, write_tiny_clip_config

torch.set_num_threads(1)
MINILM = "st:sentence-transformers/all-MiniLM-L6-v2"


pytestmark = pytest.mark.usefixtures("hf_offline")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    os.environ["HF_HUB_OFFLINE"] = "1"
    return emoji_workspace(tmp_path_factory.mktemp("cm"), 12)


def handwritten_captions(ws: Path, out: Path) -> Path:
    """A caption per image that names the emoji in a domain-specific phrasing."""
    m = pd.read_parquet(ws / "manifest.parquet")
    style = {"twemoji": "a flat colour drawing of {}", "openmoji": "{} icon with a thick outline",
             "noto_mono": "black and white line art: {}"}
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "caption"])
        for id_, dom, cls in zip(m["id"], m["domain"], m["class_name"], strict=True):
            name = cls.split("_", 1)[1].replace("_", " ")
            w.writerow([id_, style[dom].format(name)])
    return out


def test_cm_text_with_minilm_finds_matching_image_first(ws, tmp_path, capsys):
    assert cdir("caption", "-w", ws, "--from-file", handwritten_captions(ws, tmp_path / "c.csv"),
                "--name", "hand") == 0
    assert cdir("embed", "-w", ws, "--captions", "hand", "--text-encoder", MINILM) == 0
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    capsys.readouterr()
    assert cdir("eval", "-w", ws, "--mode", "cm-text,visual,fusion", "--captions", "hand",
                "--text-encoder", MINILM, "--encoder", "pixels", "--run", "hand") == 0
    out = capsys.readouterr().out
    assert "modes compared" in out
    report = ws / "reports" / "hand"
    cm = json.loads((report / "cm-text" / "results.json").read_text())["results"]
    vis = json.loads((report / "visual" / "results.json").read_text())["results"]
    # the captions name the object: caption matching finds it first across styles, raw pixels don't
    assert cm[-1]["P@1"] >= 90 and all(r["P@1"] >= 75 for r in cm[:-1])
    assert cm[-1]["P@1"] > vis[-1]["P@1"] + 20
    comparison = (report / "comparison.md").read_text()
    # one table per metric, a column per mode, the metrics defined below
    assert "### P@1" in comparison and "### mAP@All" in comparison
    assert "| pair | cm-text | visual | fusion |" in comparison
    assert "- mAP@All is the average precision" in comparison

    # fusion weights chosen on one half of the queries, reported on the other
    assert cdir("eval", "-w", ws, "--mode", "fusion", "--captions", "hand", "--text-encoder",
                MINILM, "--encoder", "pixels", "--sweep", "--run", "sweep") == 0
    out = capsys.readouterr().out
    assert "weights chosen on the held-out half" in out
    rows = json.loads((ws / "reports" / "sweep" / "results.json").read_text())["results"]
    assert 0 < rows[-1]["n_queries"] < 3 * 12 * 2  # only the held-out half was reported


def test_all_modes_with_tiny_captioner_and_tiny_clip(ws, tmp_path, capsys):
    blip = f"hf:{tiny_model_path('blip')}"
    clip = f"clip:{write_tiny_clip_config(tmp_path)}/random"
    assert cdir("caption", "-w", ws, "--captioner", blip, "--min-new-tokens", "3",
                "--max-new-tokens", "5", "--batch-size", "8", "--no-progress") == 0
    capsys.readouterr()
    assert cdir("caption", "-w", ws, "--list") == 0
    key = next(line.split()[0] for line in capsys.readouterr().out.splitlines()
               if "blip" in line)
    for spec in (MINILM, clip):
        assert cdir("embed", "-w", ws, "--captions", key, "--text-encoder", spec) == 0
    assert cdir("embed", "-w", ws, "--encoder", clip, "--workers", "0") == 0
    assert cdir("eval", "-w", ws, "--mode", "cm-text,cm-image,visual,fusion", "--captions", key,
                "--text-encoder", MINILM, "--clip", clip, "--encoder", clip, "--run", "all") == 0
    table = (ws / "reports" / "all" / "comparison.md").read_text()
    assert "| pair | cm-text | cm-image | visual | fusion |" in table
    p_at_1 = table.split("### P@1")[1].split("###")[0]
    assert p_at_1.count("→") == 6  # every directed pair of the three domains

    # search a caption index with a new image: the query is captioned on the fly
    assert cdir("index", "build", "-w", ws, "--captions", key, "--text-encoder", MINILM) == 0
    query = sorted((ws / "gallery" / "openmoji").rglob("*.png"))[0]
    capsys.readouterr()
    assert cdir("search", "-w", ws, "--image", query, "--mode", "cm-text", "-k", "3",
                "--json") == 0
    result = json.loads(capsys.readouterr().out)[0]
    assert isinstance(result["caption"], str) and result["caption"]
    assert len(result["results"]) == 3
