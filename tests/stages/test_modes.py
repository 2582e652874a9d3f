"""What the retrieval modes' table says about each mode, which the stages ask instead of the
modes' names."""

from __future__ import annotations

from cdir.recipe.config import EvalConfig
from cdir.stages.modes import MODES, SINGLE_MODES
from eval.rerank import RERANKERS


def test_each_mode_says_how_it_scores() -> None:
    assert [m for m, spec in MODES.items() if spec.fuses] == ["fusion"]
    assert [m for m in SINGLE_MODES if MODES[m].cross_modal] == ["cm-image"]
    assert [m for m in SINGLE_MODES if MODES[m].captions_query] == ["cm-text"]
    # the ModeConfig fields of the single modes' models, in the order reports list them
    assert [MODES[m].model for m in SINGLE_MODES] == ["encoder", "text_encoder", "clip"]


def test_a_recipe_reports_the_papers_own_mode_first() -> None:
    assert EvalConfig().modes == ["cm-image", "cm-text", "visual", "fusion"]
    assert sorted(MODES[m].report_row for m in MODES) == list(range(len(MODES)))


def test_only_csls_depends_on_its_neighbourhood_and_the_dual_softmax_on_beta() -> None:
    assert {name: r.uses_k for name, r in RERANKERS.items()} == {
        "none": False, "csls": True, "dual-softmax": False}
    assert [name for name, r in RERANKERS.items() if r.uses_beta] == ["dual-softmax"]
