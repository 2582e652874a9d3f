"""`cdir reproduce`: the recipes in configs/ parse; the emoji recipe runs end to end offline with
tiny models (a tiny BLIP and a tiny CLIP built from configs, the packaged all-MiniLM-L6-v2) and a
re-run skips every finished stage; the preflight lists everything that is missing and stops
before any stage; --dry-run runs nothing; the DomainNet recipe reports its (verified) class
subset and sets our clipart→sketch numbers beside CM's "C-S Score"."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from cdir import cli
from cdir.core.config import apply_sets
from cdir.core.errors import CdirError
from cdir.recipe.config import load_recipe, recipe_from_dict
from cdir.recipe.methods import build_methods
from tests.helpers.cli import cdir
from tests.helpers.tiny_models import tiny_model_path, write_tiny_clip_config
from tests.helpers.trees import write_domainnet_tree

torch.set_num_threads(1)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MINILM = "st:sentence-transformers/all-MiniLM-L6-v2"
EMOJI_PAIRS = {f"{a}→{b}" for a in ("noto_mono", "openmoji", "twemoji")
               for b in ("noto_mono", "openmoji", "twemoji") if a != b}


@pytest.fixture(autouse=True)
def offline(hf_offline, monkeypatch, tmp_path):
    # an empty Hugging Face cache: whatever this machine has cached, the paper's models are absent
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    # `reproduce` is registered in cdir/cli.py by the lead; add it here if it is not (yet)
    monkeypatch.setattr(cli, "COMMANDS", tuple(dict.fromkeys((*cli.COMMANDS, "reproduce"))))


def tiny_recipe(tmp_path: Path, base: str = "cm_emoji.yaml", **changes: object) -> Path:
    """A copy of a recipe from configs/ with tiny offline models in place of the paper's."""
    d = yaml.safe_load((CONFIGS / base).read_text())
    clip = f"clip:{write_tiny_clip_config(tmp_path)}/random"
    d["captioners"] = [{"spec": f"hf:{tiny_model_path('blip')}", "name": "tiny BLIP",
                        "min_new_tokens": 3, "max_new_tokens": 5, "batch_size": 8}]
    d["clip"] = [{"spec": clip, "name": "tiny CLIP"}]
    d["text_encoders"] = [{"spec": MINILM, "name": "MiniLM"}, {"spec": clip, "name": "tiny CLIP"}]
    d["image_encoders"] = [{"spec": clip, "name": "tiny CLIP"}, "pixels"]
    d["workspace"] = str(tmp_path / "ws")
    d.update(changes)
    path = tmp_path / f"tiny_{base}"
    path.write_text(yaml.safe_dump(d, sort_keys=False, allow_unicode=True))
    return path


# -- the recipes in configs/ -----------------------------------------------------------------------

def test_recipes_parse_with_the_literature_as_reported():
    oh = load_recipe(CONFIGS / "cm_officehome.yaml")
    assert oh.dataset.kind == "officehome" and oh.eval.ks == [1, 5, 15] and oh.eval.pairs == "all"
    assert oh.captioners[0].spec == "hf:Salesforce/blip2-opt-2.7b"
    cm = [e for e in oh.literature if e.method == "CM" and e.pair]
    assert [(e.pair, e.metric, e.value) for e in cm] == [
        ("Art:Clipart", "Retrieval Accuracy (Ar → Cl)", 78.3)]
    assert {e.method for e in oh.literature} == {"CM", "CoDA"}
    relative = next(e for e in oh.literature if e.unit)
    assert relative.value_text == "24.0" and relative.pair is None  # written as the source does
    assert all(not e.verified and e.source for e in oh.literature)
    modes = {m.mode for m in build_methods(oh)}
    assert modes == {"cm-image", "cm-text", "visual", "fusion"}

    dn = load_recipe(CONFIGS / "cm_domainnet.yaml")
    assert dn.dataset.classes == "ucdir7" and dn.eval.ks == [50, 100, 200]
    cs = next(e for e in dn.literature if e.pair == "clipart:sketch")
    assert (cs.metric, cs.value) == ("C-S Score", 96.8)
    assert not next(e for e in dn.literature if e.method == "CoDA").comparable

    emoji = load_recipe(CONFIGS / "cm_emoji.yaml", overrides=["dataset.limit=7"], root=None)
    assert emoji.dataset.limit == 7 and emoji.literature == []


def test_set_overrides_and_config_errors(tmp_path):
    d = {"captioners": ["hf:a/b"], "eval": {"ks": [1]}}
    d = apply_sets(d, ["captioners.0.batch_size=4",  # a spec string becomes a mapping
                       "eval.ks=[1, 5]", "dataset.root=/x"])
    assert d == {"captioners": [{"spec": "hf:a/b", "batch_size": 4}], "eval": {"ks": [1, 5]},
                 "dataset": {"root": "/x"}}
    d = apply_sets(d, ["captioners.1=hf:c/d"])  # one past the end appends
    assert d["captioners"][1] == "hf:c/d"
    with pytest.raises(CdirError, match="index"):
        apply_sets(d, ["captioners.3.spec=x"])
    with pytest.raises(CdirError, match="key=value"):
        apply_sets(d, ["captioners"])
    with pytest.raises(CdirError, match="unknown key.*batch_sise"):
        load_recipe(CONFIGS / "cm_emoji.yaml", overrides=["batch.batch_sise=3"])
    with pytest.raises(CdirError, match="modes"):
        load_recipe(CONFIGS / "cm_emoji.yaml", overrides=["eval.modes=[cm-video]"])


# -- preflight and dry run -------------------------------------------------------------------------

def test_preflight_lists_every_missing_item_and_runs_nothing(tmp_path, capsys):
    ws = tmp_path / "ws"
    t0 = time.perf_counter()
    assert cdir("reproduce", CONFIGS / "cm_officehome.yaml", "-w", ws) == 2
    seconds = time.perf_counter() - t0
    captured = capsys.readouterr()
    out = captured.out
    missing = [line for line in out.splitlines() if line.strip().startswith("MISSING")]
    # one message per missing thing: the dataset root, the captioner, the CLIP
    assert len(missing) == 3, out
    assert "dataset root not set" in out and "hemanthdv.org/officeHomeDataset" in out
    assert "hf download Salesforce/blip2-opt-2.7b" in out
    assert "hf download timm/vit_base_patch32_clip_224.openai" in out
    # optional models are skipped, not required; the packaged MiniLM is present
    skipped = [line for line in out.splitlines() if line.strip().startswith("skipped")]
    assert any("blip2-flan-t5-xl" in s for s in skipped) and any("ViT-L-14" in s for s in skipped)
    assert any(line.strip().startswith("ok") and "all-MiniLM-L6-v2" in line
               for line in out.splitlines())
    assert "no stage was run" in captured.err and "Traceback" not in captured.err
    assert not ws.exists()
    assert seconds < 30  # no network waits, nothing loaded

    # a root that does not exist is one message too
    assert cdir("reproduce", CONFIGS / "cm_officehome.yaml", "-w", ws, "--root",
                tmp_path / "nowhere", "--dry-run") == 2
    assert f"dataset root {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().out


def test_dry_run_prints_the_plan_and_runs_no_stage(tmp_path, officehome_root, capsys):
    config = tiny_recipe(tmp_path, "cm_officehome.yaml")
    assert cdir("reproduce", config, "--root", officehome_root, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "preflight passed" in out and "dry run: nothing was run" in out
    plan = out.split("plan:")[1].split("preflight:")[0]
    for stage in ("data", "caption", "embed-captions", "embed-images", "eval", "report"):
        assert f" {stage} " in plan
    assert plan.count(" eval ") == 6  # cm-image, cm-text x2, visual x2, fusion
    assert not (tmp_path / "ws").exists()

    # DomainNet: the classes of the ucdir7 subset must be there in every domain
    root = write_domainnet_tree(tmp_path / "dn", domains=("clipart", "sketch"), per_split=1)
    config = tiny_recipe(tmp_path, "cm_domainnet.yaml")
    assert cdir("reproduce", config, "--root", root, "--dry-run") == 2
    out = capsys.readouterr().out
    missing = [line for line in out.splitlines() if line.strip().startswith("MISSING")]
    assert len(missing) == 2 and all("5 class folder(s)" in m for m in missing), out
    assert not (tmp_path / "ws").exists()


# -- the emoji recipe end to end -------------------------------------------------------------------

def test_emoji_recipe_end_to_end_then_rerun_skips(tmp_path, capsys):
    config = tiny_recipe(tmp_path, literature=[
        {"method": "Someone", "pair": "twemoji:openmoji", "metric": "Made-up Score (Tw → Op)",
         "value": 42.5, "source": "a test", "note": "k not stated"},
        {"method": "Someone", "pair": "openmoji:twemoji", "metric": "Op→Tw Precision@1",
         "value": 61.0, "source": "a test", "compare_with": "P@1"}])
    assert cdir("reproduce", config, "--set", "dataset.limit=12", "--no-progress") == 0
    report = tmp_path / "ws" / "reports" / "cm_emoji"
    doc = json.loads((report / "reproduction.json").read_text())
    assert [s["status"] for s in doc["stages"]] == ["ran"] * len(doc["stages"])
    modes = [m["mode"] for m in doc["methods"]]
    assert sorted(modes) == ["cm-image", "cm-text", "cm-text", "fusion", "visual", "visual"]
    for m in doc["methods"]:  # every directed pair x every method, and the mean
        assert {r["pair"] for r in m["rows"]} == EMOJI_PAIRS | {"mean"}
        assert all(0 <= r["P@1"] <= 100 for r in m["rows"])
        assert (Path(m["report_dir"]) / "results.md").exists()
    assert doc["dataset"]["images"] == 36 and doc["ks"] == [1, 5, 15]
    lit = {e["metric"]: e for e in doc["literature"]}
    assert set(lit["Made-up Score (Tw → Op)"]["ours"]) == {m["label"] for m in doc["methods"]}

    md = (report / "reproduction.md").read_text()
    for k in (1, 5, 15):
        table = md.split(f"## UCDIR P@{k} (%)")[1].split("\n## ")[0]
        assert all(pair in table for pair in EMOJI_PAIRS)
        assert all(f"| {m['short']} |" in table for m in doc["methods"])
        # the entry without a k in every table (†), the P@1 one only at P@1
        assert "42.5†" in table and ("| 61.0 |" in table) == (k == 1)
    assert "## Literature (as reported) beside ours" in md
    assert "| Made-up Score (Tw → Op) | 42.5 |" in md
    assert "UCDIR P@k" in md and "not standard precision@k" in md.replace("*", "")
    # mAP@All beside P@k, per pair and mean; one emoji per class and domain: R = 1, so recall@k
    table = md.split("## mAP@All (%)")[1].split("\n## ")[0]
    assert "| mean |" in table and all(f"| {m['short']} |" in table for m in doc["methods"])
    for m in doc["methods"]:
        assert all(0 <= r["mAP@All"] <= 100 and r["max_relevant"] == 1 for r in m["rows"])
    recall = md.split("## recall@15 (%)")[1].split("\n## ")[0]
    assert "one relevant item per query: P@k = prec@1 = mAP@R; see recall@k" in recall
    assert "- mAP@All is the average precision over the whole ranked gallery" in md
    # the resolved config is written beside the report and loads back as a recipe
    again = recipe_from_dict(yaml.safe_load((report / "recipe.yaml").read_text()))
    assert again.dataset.limit == 12 and len(again.literature) == 2

    # a second run finds every stage done and only rewrites the report
    results = next(report.glob("cm-image*/results.json"))
    before = results.stat().st_mtime_ns
    capsys.readouterr()
    t0 = time.perf_counter()
    assert cdir("reproduce", config, "--set", "dataset.limit=12", "--no-progress") == 0
    assert time.perf_counter() - t0 < 15
    doc2 = json.loads((report / "reproduction.json").read_text())
    statuses = [s["status"] for s in doc2["stages"]]
    assert statuses == ["skipped"] * (len(statuses) - 1) + ["ran"]
    assert results.stat().st_mtime_ns == before
    assert [m["rows"] for m in doc2["methods"]] == [m["rows"] for m in doc["methods"]]
    assert "already done" in capsys.readouterr().out

    # another k re-evaluates, and nothing upstream of the evaluation
    assert cdir("reproduce", config, "--set", "dataset.limit=12", "--set", "eval.ks=[1,2]",
                "--no-progress") == 0
    doc3 = json.loads((report / "reproduction.json").read_text())
    status = {s["kind"]: set() for s in doc3["stages"]}
    for s in doc3["stages"]:
        status[s["kind"]].add(s["status"])
    assert status["eval"] == {"ran"} and status["report"] == {"ran"}
    assert all(status[k] == {"skipped"} for k in ("data", "caption", "embed-captions",
                                                  "embed-images"))
    assert "P@2" in doc3["methods"][0]["rows"][0]


def test_domainnet_recipe_reports_the_verified_subset(tmp_path):
    from cdir.galleries.common import CLASS_SUBSETS

    classes = CLASS_SUBSETS["ucdir7"].classes
    root = write_domainnet_tree(tmp_path / "dn", domains=("clipart", "sketch"), classes=classes,
                                per_split=1, size=24)
    config = tiny_recipe(tmp_path, "cm_domainnet.yaml")
    assert cdir("reproduce", config, "--root", root, "--set", "eval.modes=[cm-image]",
                "--no-progress") == 0
    report = tmp_path / "ws" / "reports" / "cm_domainnet"
    doc = json.loads((report / "reproduction.json").read_text())
    assert doc["ks"] == [50, 100, 200] and doc["dataset"]["classes"] == 7
    assert doc["dataset"]["class_subset"]["verified"] is True
    assert "ProtoOT" in doc["dataset"]["class_subset"]["source"]
    assert [r["pair"] for r in doc["methods"][0]["rows"]] == ["clipart→sketch", "sketch→clipart",
                                                              "mean"]
    cs = next(e for e in doc["literature"] if e["metric"] == "C-S Score")
    assert cs["in_our_pairs"] and set(cs["ours"][doc["methods"][0]["label"]]) == {
        "P@50", "P@100", "P@200"}
    md = (report / "reproduction.md").read_text()
    # the subset is verified: no warning about it, and the list is named
    assert "UNVERIFIED" not in md and "**not comparable**" not in md
    assert "bird, feather, teapot, tiger, whale, windmill, zebra" in md
    assert "96.8†" in md.split("## UCDIR P@50 (%)")[1].split("\n## ")[0]
    # CoDA's quickdraw→clipart mAP is a different benchmark: listed, never set against ours
    assert "not comparable (different benchmark)" in md
