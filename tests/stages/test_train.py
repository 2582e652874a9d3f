"""The one-line summary of a training call (`cdir train`, `adapt`, `distill`): a call that
trained nothing says where the run stands, never "trained 0 epoch(s)"."""

from __future__ import annotations

from cdir.stages.train import summary_line


def _summary(run: int, done: int, total: int, encoder: str | None) -> dict:
    return {"method": "moco", "epochs_run": run, "epochs_done": done, "epochs": total,
            "images_per_s": 0.0 if not run else 120.0, "latest": "out/latest.pt",
            "encoder": encoder, "skipped": []}


def test_a_call_that_trained_says_so() -> None:
    assert summary_line(_summary(2, 3, 5, None)) == (
        "trained moco for 2 epoch(s) (now 3/5), 120 img/s; wrote out/latest.pt")


def test_resuming_a_finished_run_says_it_is_finished() -> None:
    line = summary_line(_summary(0, 5, 5, "out/encoder.pt"))
    assert line == ("moco: already finished, 5/5 epoch(s) in out/latest.pt; nothing trained "
                    "(the encoder: out/encoder.pt)")


def test_a_stop_at_already_reached_says_how_to_go_on() -> None:
    line = summary_line(_summary(0, 2, 5, None))
    assert line.startswith("moco: nothing trained: 2/5 epoch(s) in out/latest.pt")
    assert "--resume auto" in line and "trained 0" not in line
