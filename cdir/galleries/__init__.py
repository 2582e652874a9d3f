"""Gallery loaders: each kind of dataset becomes a manifest (``cdir.core.manifest``).

``KINDS`` is the one list of gallery kinds and dispatches on them; loaders are imported when used,
so that building the command line stays fast. The loaders' public names can also be read from this
package (``galleries.load_folder``, ``galleries.resolve_classes``...): each is imported from its
module on first use.

    common       class subsets, folder walking, the rules shared by every loader
    folder       ROOT/<domain>/<class>/<image> trees
    officehome   Office-Home
    domainnet    DomainNet
    table        CSV/TSV/JSONL/Parquet tables
    emoji        the built-in emoji gallery (rendered from PyPI packages)
    corpus       unlabelled drawing corpora (Debian packages), rendered like the emoji gallery
    glyphs       characters drawn by font families of different styles
    framing      the one way a rendered drawing is framed
    splits       the fixed dev/test split of categories
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


class DataWarning(UserWarning):
    """Something about the dataset worth telling the user that does not stop the load."""


@dataclass(frozen=True)
class GalleryKind:
    help: str
    loader: str  # "module:function" below cdir.galleries
    source: str | None = "ROOT"  # what the positional argument is: ROOT, TABLE or None (built in)
    filters: bool = True  # takes domains, classes and split
    progress: bool = True  # the loader shows a progress bar
    # the manifest's `split` is the fixed dev/test split of the categories (cdir.galleries.splits)
    category_split: bool = False
    # "module:function" that first renders the gallery into the workspace, called as
    # fn(kind, source, out_dir, size=, limit=, progress=); its ROOT, if any, is optional
    build: str | None = None
    # the splits it can keep, and what the help says about them
    splits: tuple[str, ...] = ("all", "train", "test", "val")
    split_help: str = ("folder layouts with a <domain>/<split>/<class> level, or a table's "
                       "split column")
    classes_help: str = ""  # named class subsets of this dataset, for --classes' help
    # every folder under ROOT is read as a domain: a workspace inside ROOT would be scanned too
    any_folder_a_domain: bool = False
    recorded: str | None = None  # the name a workspace records as its dataset (default: the kind)

    def render(self, kind: str, source: str | None, out_dir: str, size: int,
               limit: int | None, progress: bool) -> Any:
        module, name = (self.build or "").split(":")
        fn = getattr(importlib.import_module(f"cdir.galleries.{module}"), name)
        return fn(kind, source, out_dir, size=size, limit=limit, progress=progress)

    def load(self, root: str | os.PathLike, domains: Iterable[str] | str | None = None,
             split: str = "all", classes: Any = None, progress: bool = False) -> pd.DataFrame:
        module, name = self.loader.split(":")
        fn = getattr(importlib.import_module(f"cdir.galleries.{module}"), name)
        kwargs: dict[str, Any] = {}
        if self.filters:
            kwargs.update(domains=domains, split=split, classes=classes)
        if self.progress:
            kwargs["progress"] = progress
        return fn(root, **kwargs)


KINDS: dict[str, GalleryKind] = {
    "folder": GalleryKind("a ROOT/<domain>/<class>/<image> tree", "folder:load_folder",
                          any_folder_a_domain=True),
    "officehome": GalleryKind(
        "Office-Home (Art, Clipart, Product, Real World; renamed folders accepted)",
        "officehome:load_officehome"),
    "domainnet": GalleryKind(
        "DomainNet (split files <domain>_{train,test}.txt, or the bare folders)",
        "domainnet:load_domainnet", splits=("all", "train", "test"),
        split_help="train/test need the official split files",
        classes_help=" | ucdir7 (the UCDIR/ProtoOT 7 classes)"),
    "csv": GalleryKind("a CSV/TSV/JSONL/Parquet table with path, domain and class columns",
                       "table:load_table", source="TABLE", progress=False, recorded="table"),
    "emoji": GalleryKind("the built-in emoji gallery (3 art sets; no download needed)",
                         "folder:load_folder", source=None, filters=False,
                         category_split=True, build="emoji:build"),
    "glyphs": GalleryKind(
        "Chinese characters in five font styles (brush, Ming, Hei, Noto Sans/Serif CJK)",
        "folder:load_folder", source="FONTS", filters=False, category_split=True,
        build="glyphs:build_glyphs"),
    "glyphs-latin": GalleryKind(
        "letters and digits in serif, sans, mono, handwriting and blackletter fonts",
        "folder:load_folder", source="FONTS", filters=False, category_split=True,
        build="glyphs:build_glyphs"),
    "openclipart": GalleryKind(
        "unlabelled clip-art drawings (Debian openclipart-png), for pretraining",
        "corpus:load_corpus", filters=False, progress=False, build="corpus:build_corpus"),
    "tuxpaint": GalleryKind(
        "unlabelled Tux Paint stamps (Debian tuxpaint-stamps-default), for pretraining",
        "corpus:load_corpus", filters=False, progress=False, build="corpus:build_corpus"),
}


def recorded_name(kind: str) -> str:
    """The name of gallery kind ``kind`` that a workspace's gallery.json records as its
    dataset."""
    return KINDS[kind].recorded or kind


# public name -> module below cdir.galleries, for the lazy attributes of the package
_PUBLIC: dict[str, str] = {
    "ClassSubset": "common", "CLASS_SUBSETS": "common", "SPLIT_DIRS": "common",
    "resolve_classes": "common",
    "load_folder": "folder",
    "OFFICEHOME_DOMAINS": "officehome", "OFFICEHOME_ARCHIVE_DIR": "officehome",
    "officehome_dirs": "officehome", "officehome_domain": "officehome",
    "find_officehome_root": "officehome", "load_officehome": "officehome",
    "DOMAINNET_DOMAINS": "domainnet", "domainnet_split_files": "domainnet",
    "find_domainnet_root": "domainnet", "load_domainnet": "domainnet",
    "load_table": "table",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"cdir.galleries.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
