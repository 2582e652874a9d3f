"""What `cdir eval` and `cdir index` check before they answer: repeated or unsorted k, the
stale-index hint and indexes missing new images, index names and overwrites, one report folder per
run, flag validation, small-data parameters and the common flags of every command."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cdir.cli import build_parser
from cdir.core.caption_store import CaptionStore
from cdir.core.errors import CdirError
from cdir.core.workspace import Workspace, caption_spec
from cdir.recipe.config import load_recipe
from cdir.stages.evaluate import parse_ks
from cdir.stages.index import build_index, check_index_name, fill_commands, update_commands
from eval.metrics import MetricAccumulator, compute_metrics
from eval.protocol import evaluate_pairs
from eval.topk import CosineScorer
from tests.helpers.cli import cdir, emoji_workspace, pixels_workspace
from tests.helpers.trees import write_shape_tree

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]


def error_line(err: str) -> str:
    """The one `cdir X: error:` line of a failed command (and no traceback)."""
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def eval_ws(tmp_path_factory) -> Path:
    """An emoji workspace of 6 categories × 3 art sets with pixel embeddings (read-only)."""
    ws = emoji_workspace(tmp_path_factory.mktemp("trust"), 6)
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    return ws


@pytest.fixture
def indexed_ws(tmp_path) -> Path:
    """A fresh folder-gallery workspace (2 domains × 2 shapes × 2 images) embedded with pixels,
    with its flat index."""
    return pixels_workspace(tmp_path)[1]


def grow(ws: Path) -> list[Path]:
    """Add a third shape to the gallery of ``ws`` (new files only; the others stay untouched) and
    describe it again; returns the new images, which have no vector yet."""
    root = ws.parent / "gallery"
    extra = write_shape_tree(ws.parent / "extra", domains=("a", "b"), classes=("triangle",),
                             per_class=2)
    for dom in ("a", "b"):
        shutil.copytree(extra / dom / "triangle", root / dom / "triangle")
    assert cdir("data", "folder", root, "-w", ws) == 0
    return sorted(root.glob("*/triangle/*"))


# ------------------------------------------------------------------ 3: repeated or unsorted k


def _tiny() -> tuple[CosineScorer, pd.DataFrame]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 4)).astype(np.float32)
    labels = [0, 1, 2, 0, 1, 2] * 2
    df = pd.DataFrame({"id": [f"r{i}" for i in range(12)], "path": "", "domain": ["a"] * 6 +
                       ["b"] * 6, "label": labels, "class_name": [str(c) for c in labels]})
    return CosineScorer(x, device="cpu"), df


def test_repeated_and_unsorted_ks_are_counted_once_in_the_library():
    scorer, df = _tiny()
    once = evaluate_pairs(scorer, df, ks=(1, 5), progress=False)
    messy = evaluate_pairs(scorer, df, ks=(5, 1, 1, 5), progress=False)
    assert messy == once  # same columns, same order, same numbers
    assert all(r["prec@1"] <= 100 and r["recall@1"] <= 100 for r in messy)
    hits = np.array([[True, False], [True, True]])
    r = np.array([1, 2])
    assert compute_metrics(hits, r, ks=(1, 1)) == compute_metrics(hits, r, ks=(1,))
    assert MetricAccumulator((2, 1, 2)).ks == (1, 2)
    with pytest.raises(ValueError, match="positive"):
        MetricAccumulator((0, 1))


def test_parse_ks_normalises_and_says_so_once():
    notes: list[str] = []
    assert parse_ks("15,5,1,5", note=notes.append) == (1, 5, 15)
    assert len(notes) == 1 and "1,5,15" in notes[0] and "15,5,1,5" in notes[0]
    assert parse_ks("1,5", note=notes.append) == (1, 5) and len(notes) == 1
    with pytest.raises(CdirError, match="--ks"):
        parse_ks("0,1")


def test_recipe_refuses_repeated_or_unsorted_ks():
    with pytest.raises(CdirError, match=r"eval\.ks.*\[1, 5\]"):
        load_recipe(REPO / "configs" / "cm_emoji.yaml", overrides=["eval.ks=[5, 1, 1]"])
    assert load_recipe(REPO / "configs" / "cm_emoji.yaml",
                       overrides=["eval.ks=[1, 5]"]).eval.ks == [1, 5]


def test_cli_eval_with_repeated_k_reports_the_same_numbers(eval_ws, capsys):
    assert cdir("eval", "-w", eval_ws, "--encoder", "pixels", "--ks", "1", "--run", "k1",
                "--no-progress") == 0
    capsys.readouterr()
    assert cdir("eval", "-w", eval_ws, "--encoder", "pixels", "--ks", "1,1", "--run", "k11",
                "--no-progress") == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if "repeats dropped" in line]) == 1

    def rows(run: str) -> list[dict]:
        return json.loads((eval_ws / "reports" / run / "results.json").read_text())["results"]

    assert rows("k11") == rows("k1")
    assert all(r["prec@1"] <= 100 for r in rows("k11"))


# ------------------------------------------- 4: the stale-index hint, images not embedded yet


def test_stale_index_hint_is_a_command_sequence_that_works(indexed_ws, capsys):
    ws = indexed_ws
    grow(ws)
    query = sorted((ws.parent / "gallery" / "a" / "circle").iterdir())[0]
    capsys.readouterr()
    assert cdir("search", "-w", ws, "--image", query) == 2
    line = error_line(capsys.readouterr().err)
    assert "stale" in line
    hint = line[line.index("`") + 1:line.rindex("`")]
    commands = hint.split(" && ")
    assert [shlex.split(c)[:2] for c in commands] == [["cdir", "embed"], ["cdir", "index"]]
    assert all(f"-w {shlex.quote(str(ws))}" in c for c in commands)
    for c in commands:  # pasted as printed
        assert cdir(*shlex.split(c)[1:]) == 0, c
    capsys.readouterr()
    assert cdir("search", "-w", ws, "--image", query, "--json") == 0
    assert json.loads(capsys.readouterr().out)[0]["results"][0]["path"] == str(query)
    assert cdir("index", "info", "-w", ws) == 0
    assert "stale" not in capsys.readouterr().out


def test_caption_index_hints_name_the_caption_and_embed_steps(indexed_ws):
    ws = Workspace(indexed_ws)
    ids = ws.manifest()["id"].astype(str)
    table = indexed_ws.parent / "mine.csv"
    pd.DataFrame({"id": ids, "caption": "a shape"}).to_csv(table, index=False)
    assert cdir("caption", "-w", indexed_ws, "--from-file", table, "--name", "mine") == 0
    spec = caption_spec("st:all-MiniLM-L6-v2", "mine")
    root = shlex.quote(str(indexed_ws))
    # imported captions: only the embed step can fill them
    assert fill_commands(ws, spec) == [
        f"cdir embed -w {root} --captions mine --text-encoder st:all-MiniLM-L6-v2"]
    # a captioner's source: the same captioner and generation settings first
    key = "hf:org/cap|max_new_tokens=30,num_beams=1,prompt=\"a picture of\""
    CaptionStore(ws, key).write_meta(kind="model", model="hf:org/cap", params={
        "prompt": "a picture of", "max_new_tokens": 30, "num_beams": 1}, failed=[])
    hint = update_commands(ws, caption_spec("st:x", key), "hnsw", "caps")
    steps = [shlex.split(c) for c in hint.split(" && ")]
    assert steps[0][:6] == ["cdir", "caption", "-w", str(indexed_ws), "--captioner", "hf:org/cap"]
    assert dict(zip(steps[0][6::2], steps[0][7::2], strict=True)) == {
        "--prompt": "a picture of", "--max-new-tokens": "30", "--num-beams": "1"}
    assert steps[1] == ["cdir", "embed", "-w", str(indexed_ws), "--captions", key,
                        "--text-encoder", "st:x"]
    assert steps[2] == ["cdir", "index", "build", "-w", str(indexed_ws), "--captions", key,
                        "--text-encoder", "st:x", "--type", "hnsw", "--name", "caps"]


def test_index_build_refuses_images_not_embedded_yet(indexed_ws, capsys):
    ws = indexed_ws
    missing = len(grow(ws))
    total = len(Workspace(ws).manifest())
    capsys.readouterr()
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels") == 2
    line = error_line(capsys.readouterr().err)
    assert f"{missing} of {total} images have no pixels vector yet" in line
    assert f"cdir embed -w {shlex.quote(str(ws))} --encoder pixels" in line
    assert "--allow-missing" in line
    # the refused build changed nothing: the index is still the stale one
    assert cdir("index", "info", "-w", ws) == 0
    assert "stale" in capsys.readouterr().out

    assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--allow-missing") == 0
    captured = capsys.readouterr()
    assert f"{missing} not embedded yet" in captured.err
    assert f"({missing} images left out)" in captured.out


def test_unreadable_images_do_not_block_an_index(indexed_ws, capsys):
    ws = indexed_ws
    # a new image that cannot be read: embed lists it as failed, so it is not "missing"
    grow(ws)[0].write_bytes(b"not an image")
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    capsys.readouterr()
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels") == 0
    captured = capsys.readouterr()
    assert "1 unreadable" in captured.err and "(1 images left out)" in captured.out


# ----------------------------------------------------------------- 5: index names, overwrites


@pytest.mark.parametrize("name", ["../../x", "a/b", ".hidden", "..", "", "a b", "x\\y"])
def test_unsafe_index_names_are_refused(name):
    with pytest.raises(CdirError, match="bad index name"):
        check_index_name(name)


def test_index_name_cannot_leave_the_workspace(indexed_ws, capsys):
    ws = indexed_ws
    outside = ws.parent / "escaped"
    capsys.readouterr()
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--name",
                f"../../{outside.name}") == 2
    assert "bad index name" in error_line(capsys.readouterr().err)
    assert not list(ws.parent.parent.glob("escaped*")) and not list(ws.parent.glob("escaped*"))
    assert check_index_name("pixels-v2.flat_1") == "pixels-v2.flat_1"


def test_overwriting_an_index_of_another_kind_needs_force(indexed_ws, capsys):
    ws = indexed_ws
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--name", "main") == 0
    sidecar = ws / "indexes" / "main.json"
    before = sidecar.read_text()
    capsys.readouterr()
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--type", "hnsw",
                "--name", "main") == 2
    line = error_line(capsys.readouterr().err)
    assert "main" in line and "flat" in line and "--force" in line
    assert sidecar.read_text() == before
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--type", "hnsw",
                "--name", "main", "--force") == 0
    assert json.loads(sidecar.read_text())["kind"] == "hnsw"
    # the same encoder and kind is no overwrite: it is kept as it is
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--type", "hnsw",
                "--name", "main") == 0
    assert "up to date" in capsys.readouterr().out


# --------------------------------------------------------------- 7: one report folder per run


def test_each_eval_setting_gets_its_own_report_folder(eval_ws, capsys):
    def run(*flags: str) -> Path:
        capsys.readouterr()
        assert cdir("eval", "-w", eval_ws, "--encoder", "pixels", "--no-progress", *flags) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        return Path(line.rsplit("report in ", 1)[1])

    base = run()
    folders = {base, run("--ks", "1,5"), run("--pairs", "twemoji:openmoji"),
               run("--examples", "1")}
    assert len(folders) == 4  # no run overwrote another
    assert run() == base  # the same settings: the same folder
    assert run("--ks", "15,5,1") == base  # the default ks, given in another order
    md = (base / "results.md").read_text()
    assert "- ks: 1,5,15" in md and "- pairs: all" in md and "- encoder: pixels" in md
    settings = json.loads((run("--ks", "1,5") / "results.json").read_text())["settings"]
    assert settings["ks"] == "1,5" and settings["pairs"] == "all"


def test_results_md_cites_only_files_that_exist(eval_ws, capsys):
    assert cdir("eval", "-w", eval_ws, "--encoder", "pixels", "--run", "cite",
                "--no-progress") == 0
    report = eval_ws / "reports" / "cite"
    md = (report / "results.md").read_text()
    cited = set(re.findall(r"[\w./-]+\.(?:md|py|csv|json|png|html|txt|yaml|pt)\b", md))
    cited |= set(re.findall(r"\]\(([^)]+)\)", md))  # Markdown links
    for name in cited:
        assert (report / name).exists() or (REPO / name).exists(), name


# ---------------------------------------------------------------------------- rough edges


def test_nlist_and_m_must_be_positive(indexed_ws, capsys):
    ws = indexed_ws
    for flag in ("--nlist", "--m"):
        with pytest.raises(SystemExit) as exit_:
            cdir("index", "build", "-w", ws, "--encoder", "pixels", "--type", "ivfpq", flag, "-3")
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: must be at least 1, got -3" in err and "vectors" not in err
    for value in (0, -3):
        with pytest.raises(CdirError, match="--nlist must be a positive integer"):
            build_index(ws, encoder="pixels", kind="ivf", nlist=value)
    with pytest.raises(CdirError, match="--m must be a positive integer"):
        build_index(ws, encoder="pixels", kind="hnsw", m=0)


def test_parameters_lowered_for_small_data_are_said(indexed_ws, capsys):
    ws = indexed_ws
    capsys.readouterr()
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--type", "ivfpq") == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "instead of" in line]
    assert len(notes) == 1 and "nlist 1 instead of 4·√N" in notes[0] and "pq_nbits" in notes[0]
    assert "parameters lowered for small data" in captured.out
    summary = build_index(ws, encoder="pixels", kind="ivf", name="given", nlist=1)
    assert not any("nlist" in n for n in summary["notes"])  # the value asked for is not news


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(path), parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaves(child, (*path, name))


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def test_every_command_takes_the_same_common_flags():
    leaves = dict(_leaves(build_parser()))
    # the commands that draw progress bars take --no-progress (train: sets train.progress)
    progress = [c for c in leaves if c.split()[0] in ("data", "embed", "caption", "eval",
                                                      "reproduce") or c.startswith("train synco")]
    assert len(progress) > 5
    for command in progress:
        assert _option(leaves[command], "--no-progress"), command
    # -w is always -w/--workspace
    for command, p in leaves.items():
        w = _option(p, "--workspace")
        if w is not None:
            assert w.option_strings == ["-w", "--workspace"], command
    # --device means the same everywhere it is a plain device choice
    helps = {c: _option(leaves[c], "--device").help
             for c in ("caption", "embed", "eval", "search", "demo")}
    assert len(set(helps.values())) == 1, helps


def test_eval_takes_no_progress(eval_ws, capsys):
    capsys.readouterr()
    assert cdir("eval", "-w", eval_ws, "--encoder", "pixels", "--run", "quiet",
                "--no-progress") == 0
    assert "eval:" not in capsys.readouterr().err  # the tqdm bar of the protocol


# ------------------------------------------------------------ partial stores are never whole

def test_partial_store_is_refused_by_eval_index_and_search_unless_allowed(tmp_path, capsys):
    import os
    import subprocess
    import sys

    from cdir.core.lock import beside

    ws = emoji_workspace(tmp_path, 6)  # 18 images, 6 per art set
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0", "--limit", 10) == 0
    m = Workspace(ws).manifest()
    done = set(m["id"].iloc[:10])
    want = m[~m["id"].isin(done)].groupby("domain").size()
    per = ", ".join(f"{d} {n}" for d, n in want.items())
    fill = f"cdir embed -w {shlex.quote(str(ws))} --encoder pixels"
    for args in (("eval", "-w", ws, "--encoder", "pixels"),
                 ("index", "build", "-w", ws, "--encoder", "pixels")):
        capsys.readouterr()
        assert cdir(*args) == 2
        line = error_line(capsys.readouterr().err)
        assert f"8 of 18 images have no pixels vector yet ({per})" in line, line
        assert fill in line and "--allow-missing" in line

    # allowed: evaluated, and the missing counts are in the printed table and the report
    capsys.readouterr()
    assert cdir("eval", "-w", ws, "--encoder", "pixels", "--allow-missing", "--run", "part") == 0
    out = capsys.readouterr().out
    assert f"partial: 8 of 18 images have no pixels vector yet ({per})" in out
    assert "8 not embedded yet" in out and "unreadable" not in out
    md = (ws / "reports" / "part" / "results.md").read_text()
    assert f"- missing: 8 of 18 images have no pixels vector yet ({per})" in md

    # an index built without them is not searched as a whole one
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--allow-missing") == 0
    query = m["path"].iloc[0]
    capsys.readouterr()
    assert cdir("search", "-w", ws, "--image", query) == 2
    line = error_line(capsys.readouterr().err)
    assert "8 of 18" in line and fill in line and "--allow-missing" in line
    assert cdir("search", "-w", ws, "--image", query, "--allow-missing") == 0
    assert "8 of 18" in capsys.readouterr().err

    # beside a running embed (its lock held by a live process), the refusal names it
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = beside(Workspace(ws).embeddings_dir("pixels"))
        lock.write_text(json.dumps({"pid": holder.pid, "since": "2026-01-01T10:00:00",
                                    "what": "writing the embeddings of pixels"}))
        capsys.readouterr()
        assert cdir("eval", "-w", ws, "--encoder", "pixels") == 2
        line = error_line(capsys.readouterr().err)
        assert f"an embed of pixels is still running (pid {holder.pid}" in line, line
        assert "8 of 18" in line and "single domain" not in line
    finally:
        holder.kill()
        holder.wait()
        os.unlink(lock)

    # completed: every command works without the flag
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    assert cdir("eval", "-w", ws, "--encoder", "pixels") == 0
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels") == 0
    assert cdir("search", "-w", ws, "--image", query) == 0


# -------------------------------------------------------------------------------- rough edges

def test_same_domain_pair_says_why_it_is_n_a(eval_ws, capsys):
    capsys.readouterr()
    assert cdir("eval", "-w", eval_ws, "--encoder", "pixels", "--pairs",
                "twemoji:twemoji,twemoji:openmoji", "--run", "aa") == 0
    out = capsys.readouterr().out
    assert "n/a" in out
    assert ("twemoji→twemoji: n/a: no query of twemoji has another image of its class in "
            "twemoji") in out
    assert "twemoji→openmoji: n/a" not in out


def test_search_table_footer_bad_queries_and_query_domain(tmp_path, capsys):
    ws = emoji_workspace(tmp_path, 6)
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels") == 0
    good = Workspace(ws).manifest()["path"].iloc[0]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    capsys.readouterr()
    # one unreadable query among good ones: listed and skipped, the others searched, exit 1
    assert cdir("search", "-w", ws, "--image", bad, "--image", good, "-k", 1000) == 1
    out, err = capsys.readouterr()
    assert f"query skipped: {bad}" in err and "Traceback" not in err
    assert f"query {good}" in out
    header = out.splitlines()[1].split()
    assert header == ["rank", "score", "domain", "class", "path"]
    assert "all 18 results (fewer than -k 1000)" in out and "top 1000" not in out
    assert "1 skipped (unreadable)" in out
    assert cdir("search", "-w", ws, "--image", bad) == 2
    # --query-domain on a plain index: said, not silently ignored
    capsys.readouterr()
    assert cdir("search", "-w", ws, "--image", good, "--query-domain", "twemoji") == 0
    out, err = capsys.readouterr()
    assert "--query-domain twemoji changes nothing" in err
    assert "top 10," in out


def test_empty_domain_folder_is_noted(tmp_path, capsys):
    root = write_shape_tree(tmp_path / "gallery", domains=("a", "b"),
                            classes=("circle", "square"), per_class=2)
    (root / "c" / "circle").mkdir(parents=True)  # a domain folder without any image
    capsys.readouterr()
    assert cdir("data", "folder", root, "-w", tmp_path / "ws") == 0
    err = capsys.readouterr().err
    assert "1 domain folder(s) hold no image in a class folder and are left out: c" in err
