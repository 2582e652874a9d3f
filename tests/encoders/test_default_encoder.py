"""The offline encoders shipped in the repository (the default, distilled one; the adapted one
it was distilled from, with the features its tests use; the SynCo one they started from): each
loads through the `ckpt:` spec and beats the raw-pixel baseline on every directed pair of an
emoji subset."""

import json
from pathlib import Path

import pytest
import torch

from cdir.cli import main

torch.set_num_threads(1)
WEIGHTS = Path(__file__).resolve().parents[2] / "encoders" / "weights"


@pytest.mark.parametrize("encoder", ["emoji_student.pt", "emoji_adapted.pt?grid=4&layers=3,4",
                                     "emoji_synco.pt"])
def test_shipped_encoder_beats_pixels_on_every_pair(tmp_path, encoder):
    ws = tmp_path / "ws"
    assert main(["data", "emoji", "-w", str(ws), "--limit", "200"]) == 0
    p1 = {}
    for spec in ("pixels", f"ckpt:{WEIGHTS / encoder}"):
        run = "px" if spec == "pixels" else "enc"
        assert main(["embed", "-w", str(ws), "--encoder", spec, "--workers", "0"]) == 0
        assert main(["eval", "-w", str(ws), "--encoder", spec, "--run", run,
                     "--examples", "0"]) == 0
        rows = json.loads((ws / "reports" / run / "results.json").read_text())["results"]
        p1[run] = {r["pair"]: r["P@1"] for r in rows}
    assert len(p1["px"]) == 7  # six directed pairs and the mean
    for pair, px in p1["px"].items():
        assert p1["enc"][pair] > px, (pair, p1["enc"][pair], px)
