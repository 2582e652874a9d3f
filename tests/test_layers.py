"""The floors of the project, read from the source with ``ast`` (imports inside functions too):

R1  cdir/core/ (the ground) imports nothing from the rest of cdir, nor encoders, indexes, eval or
    app; it imports torch, torchvision, transformers, open_clip and gradio only inside functions
    (or under ``if TYPE_CHECKING:``), so every command line starts fast: `cdir --help` < 2 s.
R2  encoders/, indexes/ and eval/ take from cdir only cdir.core.
R3  cdir/stages/ and cdir/recipe/ never import argparse or cdir.commands (the command line is
    the top floor: stages are called with plain arguments).
R4  encoders/ never imports eval.
R5  each list of names is written once: no two tuple/list/set literals of three or more strings
    (module-level ones, those inside functions and classes, and `choices=` arguments) nor
    module-level dict literals' keys hold the same set of strings, except two dicts keyed alike
    (a second table over the same names is a mapping, not a second list); the names the code
    dispatches on (gallery kinds, retrieval modes, methods, index kinds, spec schemes...) are the
    keys of one dict each, so that the list of names and the dispatch cannot drift apart; and no
    module that can import such a table compares a value with one of its keys (`kind ==
    "emoji"`): it asks the table's entry instead (the off switch "none" excepted: comparing with
    it asks whether an option is on, not which one it is).
R6  app/ never imports cdir.commands or cdir.cli: the demo calls the stages, as the command line
    does, never the command line itself.
R7  encoders/engine/ (the training engine) imports none of its plug-ins: encoders.ssl,
    encoders.adapt, encoders.distill (they register with it; it finds them).
R8  no two modules of one package import each other (a package's __init__ is not one of its
    modules' siblings): one of the two belongs below the other.

:func:`check_layers` returns the violations as lines; the second test proves that each rule fires
on a small fake tree.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cdir", "encoders", "indexes", "eval", "app")
HEAVY = ("torch", "torchvision", "transformers", "open_clip", "gradio")
HELP_BUDGET_S = 2.0
PLUGINS = ("encoders.ssl", "encoders.adapt", "encoders.distill")  # of encoders.engine
# file -> the dict whose keys are the names dispatched on
DISPATCH = {
    "cdir/galleries/__init__.py": "KINDS",
    "cdir/stages/modes.py": "MODES",
    "encoders/ssl/plugin.py": "METHODS",
    "encoders/adapt/plugin.py": "METHODS",
    "encoders/distill/plugin.py": "METHODS",
    "indexes/kinds.py": "KINDS",
    "indexes/normalize.py": "NORMALIZERS",
    "eval/rerank.py": "RERANKERS",
    "encoders/specs.py": "SCHEMES",
}


@dataclass(frozen=True)
class Import:
    module: str  # the dotted name imported; `from a import b` gives "a.b"
    line: int
    at_import_time: bool  # runs when the module is imported (not in a function, not TYPE_CHECKING)


@dataclass(frozen=True)
class Module:
    name: str  # dotted: cdir.core.io
    rel: str  # path relative to the root, POSIX
    tree: ast.Module


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(mod: Module, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from [.]*x import ...`` in ``mod``."""
    if not node.level:
        return node.module or ""
    package = mod.name.split(".")
    if not mod.rel.endswith("__init__.py"):
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def imports(mod: Module) -> list[Import]:
    """Every import of ``mod``, nested ones included, each marked whether it runs at import
    time."""
    out: list[Import] = []

    def visit(node: ast.AST, runs: bool) -> None:
        if isinstance(node, ast.Import):
            out.extend(Import(a.name, node.lineno, runs) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(mod, node)
            out.extend(Import(f"{base}.{a.name}" if a.name != "*" else base, node.lineno, runs)
                       for a in node.names)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            runs = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, runs)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, runs)

    visit(mod.tree, True)
    return out


def load_modules(root: Path, packages: tuple[str, ...] = PACKAGES
                 ) -> tuple[list[Module], list[str]]:
    """The parsed modules of ``packages`` under ``root``, and a line per file that does not
    parse."""
    mods, errors = [], []
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if "__pycache__" in rel:
                continue
            parts = rel[:-3].split("/")
            if parts[-1] == "__init__":
                parts = parts[:-1]
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
            except SyntaxError as e:
                errors.append(f"{rel}:{e.lineno}: does not parse ({e.msg})")
                continue
            mods.append(Module(".".join(parts), rel, tree))
    return mods, errors


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def check_imports(mods: list[Module]) -> list[str]:
    """Rules R1 to R4, R6 and R7."""
    out = []
    for mod in mods:
        for imp in imports(mod):
            where = f"{mod.rel}:{imp.line}"
            name = imp.module
            if _under(mod.name, "cdir.core"):
                if (_under(name, "cdir") and not _under(name, "cdir.core")) or \
                        _under(name, "encoders", "indexes", "eval", "app"):
                    out.append(f"R1 {where}: cdir.core imports {name}")
                if imp.at_import_time and _under(name, *HEAVY):
                    out.append(f"R1 {where}: cdir.core imports {name} at module level "
                               "(import it inside the function that needs it)")
            if _under(mod.name, "encoders", "indexes", "eval") and _under(name, "cdir") and \
                    not _under(name, "cdir.core"):
                out.append(f"R2 {where}: {mod.name.split('.')[0]} imports {name} "
                           "(only cdir.core is below it)")
            if _under(mod.name, "cdir.stages", "cdir.recipe") and \
                    _under(name, "argparse", "cdir.commands"):
                out.append(f"R3 {where}: {'.'.join(mod.name.split('.')[:2])} imports {name}")
            if _under(mod.name, "encoders") and _under(name, "eval"):
                out.append(f"R4 {where}: encoders imports {name}")
            if _under(mod.name, "app") and _under(name, "cdir.commands", "cdir.cli"):
                out.append(f"R6 {where}: app imports {name} (call the stage instead)")
            if _under(mod.name, "encoders.engine") and _under(name, *PLUGINS):
                out.append(f"R7 {where}: encoders.engine imports its plug-in {name}")
    return out


def _string_set(node: ast.expr | None) -> tuple[frozenset[str], str] | None:
    """(the strings, "seq" or "keys") of a literal of three or more string constants: a tuple,
    list or set, or the keys of a dict."""
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        items, kind = node.elts, "seq"
    elif isinstance(node, ast.Dict):
        items, kind = node.keys, "keys"
    else:
        return None
    if len(items) < 3 or not all(isinstance(e, ast.Constant) and isinstance(e.value, str)
                                 for e in items):
        return None
    return frozenset(e.value for e in items), kind  # type: ignore[union-attr]


def _listed_names(mod: Module) -> list[tuple[frozenset[str], str, str, int]]:
    """(strings, "seq" or "keys", a name for the place, line) of every literal list of names in
    ``mod``: assigned at module level (dicts too), or a tuple/list/set anywhere else."""
    out = []
    top = set()
    for node in mod.tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            found = _string_set(node.value)
            if found and names:
                out.append((*found, names[0], node.lineno))
                top.add(id(node.value))
    for node in ast.walk(mod.tree):
        if id(node) in top or not isinstance(node, ast.Tuple | ast.List | ast.Set):
            continue
        found = _string_set(node)
        if found:
            out.append((*found, "a literal", node.lineno))
    return out


def check_name_lists(mods: list[Module]) -> list[str]:
    """Rule R5, first part: each list of names written once."""
    seen: dict[frozenset[str], list[tuple[str, str, str]]] = {}
    for mod in mods:
        for strings, kind, name, line in _listed_names(mod):
            seen.setdefault(strings, []).append((f"{mod.rel}:{line}", name, kind))
    out = []
    for strings, places in seen.items():
        if len(places) < 2 or all(kind == "keys" for _, _, kind in places):
            continue
        listed = ", ".join(f"{name} ({where})" for where, name, _ in places)
        out.append(f"R5 the names {sorted(strings)} are listed {len(places)} times: {listed}")
    return out


def _table_keys(root: Path, tables: dict[str, str]) -> dict[str, list[str]]:
    """key -> the files of the dispatch tables that have it."""
    keys: dict[str, list[str]] = {}
    for rel, name in tables.items():
        path = root / rel
        if not path.is_file():
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            targets = (node.targets if isinstance(node, ast.Assign) else [node.target]
                       if isinstance(node, ast.AnnAssign) else [])
            if any(isinstance(t, ast.Name) and t.id == name for t in targets) and \
                    isinstance(node.value, ast.Dict):
                for k in node.value.keys:
                    if isinstance(k, ast.Constant) and isinstance(k.value, str):
                        keys.setdefault(k.value, []).append(rel)
    return keys


def _module_name(rel: str) -> str:
    return rel[:-3].replace("/", ".").removesuffix(".__init__")


def _may_import(mod: Module, target: str) -> bool:
    """Whether the floors (R1-R4, R6, R7) let ``mod`` import the module ``target``."""
    return not check_imports([Module(mod.name, mod.rel, ast.parse(f"import {target}\n"))])


OFF = "none"  # the off switch of every option table (R5)


def check_key_comparisons(mods: list[Module], root: Path,
                          tables: dict[str, str] = DISPATCH) -> list[str]:
    """Rule R5, last part: no comparison with a table's key outside the table's module, in a
    module that could ask the table instead."""
    keys = _table_keys(root, tables)
    out = []
    for mod in mods:
        for node in ast.walk(mod.tree):
            if not isinstance(node, ast.Compare):
                continue
            for side in (node.left, *node.comparators):
                if not (isinstance(side, ast.Constant) and isinstance(side.value, str)) or \
                        side.value == OFF or mod.rel in keys.get(side.value, [mod.rel]):
                    continue
                owners = [t for t in keys[side.value] if _may_import(mod, _module_name(t))]
                if owners:
                    out.append(f"R5 {mod.rel}:{node.lineno}: compares with {side.value!r}, a key "
                               f"of {tables[owners[0]]} in {owners[0]} (ask the table's entry)")
    return out


def check_cycles(mods: list[Module]) -> list[str]:
    """Rule R8."""
    names = {m.name for m in mods}

    def module_of(imported: str) -> str:  # `from a.b import c`: a.b.c if a module, else a.b
        while imported and imported not in names:
            imported = imported.rpartition(".")[0]
        return imported

    edges: dict[str, dict[str, str]] = {}
    for mod in mods:
        if mod.rel.endswith("__init__.py"):
            continue
        for imp in imports(mod):
            target = module_of(imp.module)
            if target != mod.name and target.rpartition(".")[0] == mod.name.rpartition(".")[0]:
                edges.setdefault(mod.name, {}).setdefault(target, f"{mod.rel}:{imp.line}")
    return [f"R8 {edges[a][b]}: {a} and {b} import each other ({edges[b][a]})"
            for a in sorted(edges) for b in sorted(edges[a]) if a < b and a in edges.get(b, {})]


def check_dispatch(root: Path, tables: dict[str, str] = DISPATCH) -> list[str]:
    """Rule R5, second half: each table in ``tables`` is a module-level dict literal with string
    keys."""
    out = []
    for rel, name in tables.items():
        path = root / rel
        if not path.is_file():
            out.append(f"R5 {rel}: missing (it should define the dispatch table {name})")
            continue
        values = [node.value for node in ast.parse(path.read_text(encoding="utf-8")).body
                  if isinstance(node, ast.Assign | ast.AnnAssign) and any(
                      isinstance(t, ast.Name) and t.id == name
                      for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))]
        if len(values) != 1 or not isinstance(values[0], ast.Dict) or not all(
                isinstance(k, ast.Constant) and isinstance(k.value, str) for k in values[0].keys):
            out.append(f"R5 {rel}: {name} should be assigned once, a dict literal keyed by the "
                       "names dispatched on")
    return out


def check_layers(root: Path | str) -> list[str]:
    """Every violation of R1 to R8 in the packages under ``root``, one line each."""
    mods, errors = load_modules(Path(root))
    return (errors + check_imports(mods) + check_name_lists(mods) + check_dispatch(Path(root))
            + check_key_comparisons(mods, Path(root)) + check_cycles(mods))


# -------------------------------------------------------------------------------------------------


def test_the_tree_keeps_its_floors() -> None:
    violations = check_layers(REPO)
    assert not violations, "\n".join(violations)


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in path.relative_to(root).parents:  # packages all the way down
        if parent != Path(".") and not (root / parent / "__init__.py").exists():
            (root / parent / "__init__.py").write_text("")
    path.write_text(text)


def test_each_rule_reports_its_violation(tmp_path: Path) -> None:
    ok = {
        "cdir/core/fine.py": "from typing import TYPE_CHECKING\n"
                             "from cdir.core.errors import CdirError\n"
                             "if TYPE_CHECKING:\n    import torch\n"
                             "def f():\n    import torch\n    return torch\n",
        "cdir/core/errors.py": "class CdirError(Exception): ...\n",
        "encoders/fine.py": "import torch\nfrom cdir.core import errors\n",
        "encoders/engine/fine.py": "from encoders.zoo import backbones\n",
        "encoders/ssl/fine.py": "from encoders.engine import run\n",  # plug-in -> engine: fine
        "cdir/stages/fine.py": "from cdir.galleries import KINDS\n",
        "cdir/galleries/__init__.py": "KINDS = {'a': 1, 'b': 2, 'c': 3}\n",
        "cdir/galleries/prompts.py": "PROMPTS = {'a': 'x', 'b': 'y', 'c': 'z'}\n",  # dict vs dict
        "app/fine.py": "from cdir.stages.embed import embed_images\nimport cdir.commandsx\n",
        # encoders may not import cdir.galleries: a string there is not a gallery kind
        "encoders/words.py": "def f(x):\n    return x == 'b'\n",
        "cdir/galleries/own.py": "def f(kind):\n    return kind != 'none'\n",  # the off switch
        "cdir/stages/low.py": "X = 1\n",
        "cdir/stages/high.py": "from cdir.stages.low import X\n",  # one way only: fine
    }
    for rel, text in ok.items():
        _write(tmp_path, rel, text)
    tables = {"cdir/galleries/__init__.py": "KINDS", "cdir/galleries/prompts.py": "PROMPTS"}
    mods, errors = load_modules(tmp_path)
    assert errors + check_imports(mods) + check_name_lists(mods) + check_cycles(mods) == []
    assert check_dispatch(tmp_path, tables) == []
    assert check_key_comparisons(mods, tmp_path, tables) == []

    bad = {
        "cdir/core/x.py": "from cdir.stages import y\n",
        "cdir/core/t.py": "import torch\n",
        "cdir/core/rel.py": "from ..commands import data\n",
        "encoders/z.py": "def f():\n    import eval.ssl\n",
        "encoders/engine/loop.py": "def f():\n    from ..distill.trainer import run\n",
        "eval/w.py": "from cdir import cli\n",
        "cdir/stages/s.py": "import argparse\n",
        "cdir/recipe/r.py": "class C:\n    from cdir.commands.train import run\n",
        "cdir/stages/modes.py": "MODES = ('visual', 'cm-text', 'cm-image')\n",
        "cdir/recipe/config.py": "ALL_MODES: tuple[str, ...] = ('cm-image', 'visual', 'cm-text')\n",
        "cdir/recipe/kinds.py": "DATASET_KINDS = ['a', 'b', 'c']\n",
        "cdir/core/broken.py": "def f(:\n",
        "app/w.py": "def f():\n    from cdir.cli import build_parser\n",
        "app/v.py": "from cdir.commands.embed import run\n",
        "cdir/recipe/inner.py": "def f():\n    return [x for x in ('p', 'q', 'r')]\n",
        "cdir/commands/c.py": "def f(p):\n    p.add_argument('--x', choices=['r', 'q', 'p'])\n",
        "cdir/stages/cmp.py": "def f(kind):\n    return 'x' if kind == 'b' else 'y'\n",
        "cdir/stages/p.py": "from cdir.stages import q\n",
        "cdir/stages/q.py": "def f():\n    from cdir.stages.p import g\n",
    }
    for rel, text in bad.items():
        _write(tmp_path, rel, text)
    found = check_layers(tmp_path)
    expected = [
        "cdir/core/broken.py:1: does not parse",
        "R1 cdir/core/x.py:1: cdir.core imports cdir.stages.y",
        "R1 cdir/core/t.py:1: cdir.core imports torch at module level",
        "R1 cdir/core/rel.py:1: cdir.core imports cdir.commands.data",
        "R4 encoders/z.py:2: encoders imports eval.ssl",
        "R7 encoders/engine/loop.py:2: encoders.engine imports its plug-in "
        "encoders.distill.trainer.run",
        "R2 eval/w.py:1: eval imports cdir.cli",
        "R3 cdir/stages/s.py:1: cdir.stages imports argparse",
        "R3 cdir/recipe/r.py:2: cdir.recipe imports cdir.commands.train.run",
        "R5 the names ['cm-image', 'cm-text', 'visual'] are listed 2 times",
        "R5 the names ['a', 'b', 'c'] are listed 3 times",
        "R6 app/w.py:2: app imports cdir.cli.build_parser",
        "R6 app/v.py:1: app imports cdir.commands.embed.run",
        "R5 the names ['p', 'q', 'r'] are listed 2 times",
        "R5 cdir/stages/cmp.py:2: compares with 'b', a key of KINDS in cdir/galleries/__init__.py",
        "R8 cdir/stages/p.py:1: cdir.stages.p and cdir.stages.q import each other",
    ]
    for line in expected:
        assert any(f.startswith(line) for f in found), f"{line!r} not in:\n" + "\n".join(found)
    # the fake tree has no stages/modes.py MODES dict etc.: the real tables are reported missing
    assert len([f for f in found if f not in check_dispatch(tmp_path)]) == len(expected), \
        "\n".join(found)

    _write(tmp_path, "cdir/galleries/__init__.py", "KINDS = ('a', 'b', 'c')\n")
    _write(tmp_path, "cdir/galleries/prompts.py", "PROMPTS = dict(a=1, b=2)\n")
    assert check_dispatch(tmp_path, tables) == [
        "R5 cdir/galleries/__init__.py: KINDS should be assigned once, a dict literal keyed by the "
        "names dispatched on",
        "R5 cdir/galleries/prompts.py: PROMPTS should be assigned once, a dict literal keyed by "
        "the names dispatched on"]


def test_help_is_fast() -> None:
    """`python -m cdir --help` (interpreter start included), best of three, under 2 s."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "cdir", "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        best = min(best, time.perf_counter() - t)
        assert proc.returncode == 0, proc.stderr
    assert best < HELP_BUDGET_S, f"`cdir --help` took {best:.2f} s (budget {HELP_BUDGET_S} s)"
