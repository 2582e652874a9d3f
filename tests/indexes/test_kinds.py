"""The index kinds table: each kind's parameters, knob and device flags agree with what FAISS
builds, the command line lists the kinds from it, and nothing outside it tests a kind's name."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from cdir.core.errors import CdirError  # noqa: E402
from indexes.build import build_index  # noqa: E402
from indexes.kinds import KINDS, default_params, kind_of  # noqa: E402
from indexes.meta import FORMAT_VERSION, index_files, read_meta  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _unit(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("name", list(KINDS))
def test_each_kind_builds_what_it_declares(name: str) -> None:
    kind = KINDS[name]
    params = default_params(name, 2000, 16)
    assert set(params) <= set(kind.params)
    if kind.knob is not None:
        assert kind.knob.name in kind.params and kind.knob.name in params
        tries = kind.knob.tries(params)
        assert tries == sorted(set(tries)) and tries[0] >= 1
    assert (kind.train is None) == (kind.train_points is None)
    assert not kind.on_disk or kind.train is not None  # merged lists come from a trained index

    x = _unit(2000)
    index = build_index(x, [str(i) for i in range(len(x))], ["d"] * len(x), name, gpu=False)
    assert len(index) == 2000 and index.index_kind is kind
    got = index.stored_vectors(["0", "5"])
    assert (got is not None) == kind.exact_vectors
    if got is not None:
        np.testing.assert_allclose(got, x[[0, 5]], atol=1e-6)
    # the exact kind finds each vector first; the search knob, when there is one, is honoured
    res = index.search(x[:5], k=3, nprobe=params.get("nlist"), ef_search=256)
    if kind.knob is None:
        assert res.positions[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_an_unknown_kind_is_refused_naming_the_kinds() -> None:
    with pytest.raises(CdirError, match="unknown index type 'lsh': choose one of " +
                       ", ".join(KINDS)):
        kind_of("lsh")
    with pytest.raises(CdirError, match="no parameter.*pq_m.*takes nlist"):
        default_params("ivf", 1000, 16, pq_m=4)


def test_the_command_line_lists_the_kinds_from_the_table() -> None:
    from cdir.cli import build_parser

    parser = build_parser()
    index = next(a for a in parser._subparsers._group_actions[0].choices["index"]._actions
                 if a.dest == "action")
    build = index.choices["build"]
    kind_flag = next(a for a in build._actions if a.dest == "type")
    assert tuple(kind_flag.choices) == (*KINDS, "auto")
    for name, kind in KINDS.items():
        assert f"{name}: {kind.help}" in kind_flag.help


def test_a_sidecar_of_the_first_format_loads(tmp_path: Path) -> None:
    """A sidecar written before the fields of later versions existed still reads (same format)."""
    x = _unit(50)
    path = build_index(x, [str(i) for i in range(50)], ["d"] * 50, "flat", gpu=False).save(
        tmp_path / "old")
    sidecar = index_files(path).meta
    raw = json.loads(sidecar.read_text())
    old = {k: raw[k] for k in ("encoder_spec", "kind", "dim", "count", "manifest_fingerprint",
                               "metric", "params", "domain_counts", "created", "versions",
                               "files", "format")}
    sidecar.write_text(json.dumps(old))
    meta = read_meta(path)
    assert (meta.kind, meta.count, meta.format, meta.normalize) == ("flat", 50, FORMAT_VERSION,
                                                                   "none")


def _kind_name_tests(tree: ast.AST) -> list[int]:
    """Lines comparing something to an index kind's name (``kind == "hnsw"``, ``kind in
    ("ivf", "ivfpq")``)."""
    names = set(KINDS)
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for right in node.comparators:
            consts = right.elts if isinstance(right, ast.Tuple | ast.List | ast.Set) else [right]
            if any(isinstance(c, ast.Constant) and c.value in names for c in consts):
                lines.append(node.lineno)
    return lines


def test_only_the_kinds_module_tests_a_kind_name() -> None:
    found = []
    for pkg in ("indexes", "cdir", "app", "eval"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            if path == REPO / "indexes" / "kinds.py":
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            found += [f"{path.relative_to(REPO)}:{line}" for line in _kind_name_tests(tree)]
    assert not found, "ask indexes.kinds.KINDS instead: " + ", ".join(found)
    # and the check fires
    fake = "if index.kind == 'hnsw':\n    pass\nok = kind in ('ivf', 'ivfpq')\n"
    assert _kind_name_tests(ast.parse(fake)) == [1, 3]


def test_gpu_handling_of_each_kind_without_a_gpu(caplog: pytest.LogCaptureFixture) -> None:
    """What runs on a GPU, checked where there is none: the GPU copy of an IVF index is searched
    with at most FAISS's GPU k-limit lists; a copy that cannot be made leaves the index on CPU."""
    from indexes.kinds import GPU_MAX_K, choose_device, to_gpu

    for name, kind in KINDS.items():
        device, _ = choose_device(name, None, num_gpus=1, gpu_build=True)
        assert device == ("gpu" if kind.gpu else "cpu")
        if kind.knob is not None and kind.knob.gpu_search_params is not None:
            assert kind.knob.gpu_search_params(5 * GPU_MAX_K).nprobe == GPU_MAX_K
            assert kind.knob.search_params(5 * GPU_MAX_K).nprobe == 5 * GPU_MAX_K
    if not hasattr(faiss, "StandardGpuResources"):  # the CPU build: the copy fails, with a note
        assert to_gpu(faiss.IndexFlatIP(4), "flat index") is None
        assert "could not move the flat index to GPU 0" in caplog.text
