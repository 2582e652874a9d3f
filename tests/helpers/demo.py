"""A small demo workspace with every kind of index: 8 emoji categories in 3 art sets, an image
index of raw pixels (plain and per-domain whitened), hand-written captions that name each emoji
embedded with the real MiniLM, and the tiny BLIP to caption image queries (cm-text, fusion)."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from tests.helpers.cli import cdir, emoji_workspace
from tests.helpers.tiny_models import tiny_model_path

MINILM = "st:sentence-transformers/all-MiniLM-L6-v2"
CLASSES = 8


def blip() -> str:
    return f"hf:{tiny_model_path('blip')}"


def demo_workspace(parent: Path) -> Path:
    ws = emoji_workspace(parent, CLASSES)
    m = pd.read_parquet(ws / "manifest.parquet")
    table = Path(parent) / "names.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "caption"])
        for id_, cls in zip(m["id"], m["class_name"], strict=True):
            w.writerow([id_, "a picture of a " + cls.split("_", 1)[1].replace("_", " ")])
    assert cdir("caption", "-w", ws, "--from-file", table, "--name", "names") == 0
    assert cdir("embed", "-w", ws, "--captions", "names", "--text-encoder", MINILM) == 0
    assert cdir("index", "build", "-w", ws, "--captions", "names", "--text-encoder",
                MINILM) == 0
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    for norm in ("none", "domain-whiten"):
        assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--normalize", norm) == 0
    return ws


def image_only_workspace(parent: Path) -> Path:
    """The default workspace's shape on a small scale: 8 emoji categories in 3 art sets, one
    image encoder without a text tower (raw pixels), a plain and a per-domain whitened index,
    no captions."""
    ws = emoji_workspace(parent, CLASSES)
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    for norm in ("none", "domain-whiten"):
        assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--normalize", norm) == 0
    return ws
