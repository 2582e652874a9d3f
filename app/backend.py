"""The demo's search backend, free of Gradio: queries (an image, a gallery item, a text) in,
ranked gallery items out, every failure turned into a message for the page.

It searches the workspace's indexes exactly as `cdir search` does (`cdir.stages.search`), with
what a demo adds: the query's own domain (known for a gallery item, detected otherwise) left out
of the default target, the query itself never returned as its own first result, text queries,
score fusion of an image and a caption index, readable class names and thumbnails made once.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from app.batcher import Batcher
from cdir.core.errors import CdirError
from cdir.core.images import BadImage, load_image
from cdir.core.io import atomic_write, sha256_file
from cdir.core.workspace import Workspace, split_caption_spec
from cdir.stages.index import list_indexes
from cdir.stages.modes import MODES
from cdir.stages.search import Hit, Searcher, compatible_record
from encoders.specs import parse_spec
from indexes.normalize import NORMALIZERS

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

OTHER_DOMAINS = "every other domain"  # the default target: all but the query's own
ALL_DOMAINS = "all domains"
DETECT = "detect"
TEXT = "text"  # the mode of a text query against the chosen index
THUMB = 192  # thumbnails: longest side in pixels; smaller gallery images are served as they are
WARM_THUMBS = 20_000  # gallery images whose thumbnails a starting server prepares beforehand
DETECT_NEIGHBOURS = 10


def _on_images(mode: str) -> bool:
    """Does ``mode`` search an image index alone (not captions, not a fusion)?"""
    return mode in MODES and MODES[mode].gallery == "image"


def _captions_query(mode: str) -> bool:
    """Is a query image captioned at query time in ``mode`` (its caption is the query)?"""
    return mode in MODES and MODES[mode].captions_query


@dataclass(frozen=True)
class IndexInfo:
    name: str
    spec: str  # the encoder spec (``<text encoder>@captions:<source>`` for a caption index)
    normalize: str
    caption: bool  # over caption embeddings, not image embeddings

    @property
    def label(self) -> str:
        return self.spec + ("" if self.normalize == "none" else f" ({self.normalize})")


@dataclass(frozen=True)
class Query:
    """An image (a file on disk) or a text; ``item``: the gallery id when the image is one."""
    path: str | None = None
    text: str | None = None
    item: str | None = None


@dataclass(frozen=True)
class _Work:
    """One query's work on one index, batched with the others on that index."""
    image: Image.Image | None
    text: str | None
    domain: str | None  # its domain when given or known: the normaliser's statistics
    own: str | None  # the domain an earlier part of a fusion settled on
    target: str
    depth: int
    item: str | None  # the gallery item it is, never returned


@dataclass
class Answer:
    hits: list[Hit] = field(default_factory=list)
    message: str = ""  # what the page shows above the results (an error, or what was done)
    error: bool = False
    bad_file: bool = False  # the query file is not a usable image (the page may delete it)
    query_domain: str | None = None
    caption: str | None = None  # the query's generated caption (cm-text, fusion)
    seconds: float = 0.0


def readable_name(class_name: str) -> str:
    """``u1f47b_ghost`` -> ``👻 ghost``; other names with ``_`` become spaces."""
    m = re.fullmatch(r"u([0-9a-f]{4,6})(?:_(.*))?", class_name)
    if m:
        char = chr(int(m.group(1), 16))
        name = (m.group(2) or "").replace("_", " ") or unicodedata.name(char, "").lower()
        return f"{char} {name}".strip()
    return class_name.replace("_", " ")


class DemoBackend:
    """The workspace's up-to-date indexes, one warm Searcher per (index, mode) shared by every
    request, and the gallery's names, content hashes and thumbnails."""

    def __init__(self, workspace: str | Path, device: str | None = None,
                 captioner: str | None = None, query_encoder: str | None = None):
        self.ws = Workspace(workspace).require()
        self.device, self.captioner = device, captioner
        rows = [r for r in list_indexes(self.ws.root) if r["current"]]
        self.indexes = [IndexInfo(r["name"], r["encoder_spec"], r.get("normalize") or "none",
                                  split_caption_spec(r["encoder_spec"]) is not None)
                        for r in rows]
        if not self.indexes:
            raise CdirError(f"no up-to-date index in {self.ws.root}: build one with "
                            f"`cdir index build -w {self.ws.root} --encoder SPEC`")
        # a compatible query encoder encodes the image queries of the index it was trained for
        # (the Searcher checks that index's content); the other indexes keep their own encoders
        self.query_encoder, self.query_index = query_encoder, None
        if query_encoder is not None:
            self.query_index = str(compatible_record(query_encoder).get("index"))
            if self.query_index not in {i.name for i in self.indexes}:
                raise CdirError(f"{query_encoder} was trained for index {self.query_index}, "
                                f"which {self.ws.root} has not (up to date)")
        m = self.ws.manifest()
        self.domains = sorted(m["domain"].astype(str).unique())
        self.rows = m.set_index("id", drop=False)
        # id -> (path, domain, class name): a dict, as a pandas lookup per hit is slow
        self._row = {i: (str(p), str(d), str(c)) for i, p, d, c in zip(
            m["id"], m["path"], m["domain"], m["class_name"], strict=True)}
        self._by_path = {os.path.realpath(p): i for p, i in zip(m["path"], m["id"], strict=True)}
        self._by_size: dict[int, list[str]] = {}  # file size -> ids, to recognise uploads
        for i, size in zip(m["id"], m["file_size"], strict=True):
            if size == size:  # not NaN: a row without file facts is never matched by content
                self._by_size.setdefault(int(size), []).append(i)
        self._hash_of: dict[str, str] = {}  # id -> content hash, computed when first needed
        self._captions: dict[str, dict[str, str]] = {}
        self._searchers: dict[tuple[str, str], Searcher] = {}
        self._lock = threading.Lock()
        self._batcher = Batcher(self._rank)
        self.thumb_dir = self.ws.root / "cache" / "thumbs"
        self._thumbs: dict[tuple, str] = {}  # (path, size, mtime) -> its thumbnail

    # -- what the page offers -------------------------------------------------------------------
    def image_indexes(self) -> list[IndexInfo]:
        return [i for i in self.indexes if not i.caption]

    def caption_indexes(self) -> list[IndexInfo]:
        return [i for i in self.indexes if i.caption]

    def info(self, name: str | None) -> IndexInfo | None:
        return next((i for i in self.indexes if i.name == name), None)

    def modes(self) -> list[str]:
        """The modes this workspace's indexes allow."""
        img, cap = self.image_indexes(), self.caption_indexes()
        clip_cap = any(parse_spec(split_caption_spec(i.spec)[0]).cross_modal for i in cap)
        out = (["visual"] if img else []) + (["cm-text"] if cap else [])
        out += ["cm-image"] if clip_cap else []
        return out + (["fusion"] if img and cap else [])

    def default_mode(self) -> str:
        return self.modes()[0]

    def text_note(self) -> str | None:
        """Why this workspace takes no text query and how to make it take one; None when it
        does (a caption index, or a CLIP image index: a text tower)."""
        if self.caption_indexes() or any(parse_spec(i.spec).cross_modal
                                         for i in self.image_indexes()):
            return None
        ws = self.ws.root
        return (f"Text search needs a caption index, and this workspace has none ("
                f"{', '.join(sorted({i.spec for i in self.indexes}))} has no text tower). "
                f"Import captions (a CSV of id,caption) with `cdir caption -w {ws} --from-file "
                f"captions.csv --name mine` or write them with `cdir caption -w {ws} "
                f"--captioner hf:MODEL`, then `cdir embed -w {ws} --captions mine "
                f"--text-encoder st:sentence-transformers/all-MiniLM-L6-v2` and `cdir index "
                f"build -w {ws} --captions mine --text-encoder "
                f"st:sentence-transformers/all-MiniLM-L6-v2`, and restart the demo.")

    def served_dirs(self) -> list[str]:
        """The one folder the server may serve files from: the thumbnails' (`thumbnail`)."""
        self.thumb_dir.mkdir(parents=True, exist_ok=True)
        return [str(self.thumb_dir.resolve())]

    def examples(self) -> list[str]:
        """One query per domain, each of another class, spread over the gallery."""
        out: list[str] = []
        used: set[str] = set()
        m = self.rows.reset_index(drop=True)
        for i, d in enumerate(self.domains):
            rows = m[m["domain"].astype(str) == d]
            if rows.empty:
                continue
            start = (len(rows) * (2 * i + 1)) // (2 * len(self.domains) + 1)
            order = list(range(start, len(rows))) + list(range(start))
            for j in order:
                r = rows.iloc[j]
                if r["class_name"] not in used and Path(r["path"]).exists():
                    out.append(str(r["path"]))
                    used.add(r["class_name"])
                    break
        return out

    def warm_up(self) -> None:
        """Load the default searcher's models and prepare the thumbnails now, so the first
        visitors do not wait."""
        mode = self.default_mode()
        index = (self.image_indexes() or self.caption_indexes())[0].name
        path = self.examples()[:1]
        if path and _on_images(mode):
            self.search(Query(path=path[0]), mode, index, None)  # index, rows, thumbnails
            # a gallery item is searched with its stored vector: run the encoder itself too
            self.searcher(index, mode).query_vectors([load_image(path[0])])
        self.warm_thumbnails()  # about 0.5 ms an image: done before the first visitor comes

    def warm_thumbnails(self, limit: int = WARM_THUMBS) -> int:
        """Prepare the thumbnails of the first ``limit`` gallery images (made, or found from an
        earlier run), so that no answer pays for a thumbnail's first use: under load that was a
        quarter of the server's time per query (hashing the key, finding the file, resolving
        its path). Returns how many are ready."""
        for path in self.rows["path"].iloc[:limit]:
            self.thumbnail(str(path))
        return min(limit, len(self.rows))

    # -- queries ---------------------------------------------------------------------------------
    def gallery_item(self, path: str) -> str | None:
        """The gallery id of the image file ``path``: by path, else by content (an upload of a
        gallery file: only the gallery files of the same size are hashed, once), else None."""
        item = self._by_path.get(os.path.realpath(path))
        if item is not None:
            return item
        try:
            size = os.path.getsize(path)
        except OSError:
            return None
        same_size = self._by_size.get(size, [])
        if not same_size:
            return None
        digest = sha256_file(path)
        for i in same_size:
            with self._lock:
                known = self._hash_of.get(i)
            if known is None:
                try:
                    known = sha256_file(self._row[i][0])
                except OSError:
                    continue
                with self._lock:
                    self._hash_of[i] = known
            if known == digest:
                return i
        return None

    def item_query(self, item: str) -> Query:
        return Query(path=self._row[item][0], item=item)

    def preview(self, query: Query) -> str | None:
        """The file the page shows as the query image of a gallery item."""
        return self.thumbnail(query.path) if query.item and query.path else query.path

    def searcher(self, index: str, mode: str) -> Searcher:
        with self._lock:
            key = (index, mode)
            if key not in self._searchers:
                # image queries against image vectors: where a query encoder stands in
                m = MODES.get(mode)
                compatible = (index == self.query_index and m is not None
                              and (m.query, m.gallery) == ("image", "image"))
                self._searchers[key] = Searcher(
                    str(self.ws.root), index=index, device=self.device,
                    mode=None if mode in ("visual", TEXT) else mode,
                    captioner=self.captioner if _captions_query(mode) else None,
                    query_encoder=self.query_encoder if compatible else None)
            return self._searchers[key]

    def search(self, query: Query, mode: str, index: str | None, caption_index: str | None,
               target: str = OTHER_DOMAINS, k: int = 12, query_domain: str = DETECT,
               weight: float = 0.5) -> Answer:
        """The top ``k`` of ``query`` in ``target`` (a domain, ALL_DOMAINS or OTHER_DOMAINS);
        ``weight``: the image index's share of a fusion score. Never raises a CdirError: it
        becomes the answer's message."""
        t0 = time.perf_counter()
        try:
            answer = self._search(query, mode, index, caption_index, target, int(k),
                                  query_domain, float(weight))
        except BadImage as e:
            answer = Answer(message=f"This file cannot be searched: {_reason(e, query)}",
                            error=True, bad_file=True)
        except CdirError as e:
            answer = Answer(message=str(e), error=True)
        answer.seconds = time.perf_counter() - t0
        return answer

    def _search(self, query: Query, mode: str, index: str | None, caption_index: str | None,
                target: str, k: int, query_domain: str, weight: float) -> Answer:
        if query.path is None and not (query.text or "").strip():
            return Answer(message="Upload, paste or click an image, or type a text, to search.")
        if k < 1:
            raise CdirError(f"k must be at least 1, got {k}")
        for name, d in (("domain", target), ("query domain", query_domain)):
            if d not in (OTHER_DOMAINS, ALL_DOMAINS, DETECT, *self.domains):
                raise CdirError(f"unknown {name} {d!r}: the gallery has {', '.join(self.domains)}")
        parts = self._parts(mode, index, caption_index, text=query.path is None)
        image = None
        item = query.item
        if query.path is not None:
            image = load_image(query.path)
            if image.width * image.height == 0:
                raise BadImage(f"{query.path}: empty image")
            item = item or self.gallery_item(query.path)
        known = self._row[item][1] if item is not None else None
        given = None if query_domain == DETECT else query_domain
        n = len(self.rows)
        depth = k + 1 if len(parts) == 1 else min(n, max(5 * k, 50))
        ranked: list[dict[str, float]] = []
        caption = used = None
        for part_mode, info in parts:
            key = (info.name, TEXT if image is None else part_mode)
            got, domain, cap = self._batcher.submit(key, _Work(
                image, query.text, given or known, used, target, depth, item))
            ranked.append(got)
            caption, used = caption or cap, used or domain
        scores = _fuse(ranked, [weight, 1 - weight]) if len(ranked) == 2 else ranked[0]
        best = sorted(scores.items(), key=lambda kv: -kv[1])[:k]
        caption_source = next((split_caption_spec(i.spec)[1] for _, i in parts if i.caption), None)
        hits = [self._hit(r, i, v, caption_source) for r, (i, v) in enumerate(best, 1)]
        normalised = self.searcher(parts[0][1].name, parts[0][0]).normalizer is not None
        how = ("given" if given else "the gallery item's" if known else
               "nearest centroid" if normalised else
               "detected from its nearest gallery items" if used else "")
        desc = ", ".join(f"{m} on {i.label}" for m, i in parts)
        other = "all domains" if image is None else "every domain but the query's"
        where = {OTHER_DOMAINS: other, ALL_DOMAINS: "all domains"}.get(target, target)
        msg = f"{'text ' if image is None else ''}{desc}: top {len(hits)} in {where}"
        if used:
            msg += f"; query domain {used} ({how})"
        own = used or known
        if image is not None and own and target in (ALL_DOMAINS, own):
            if item is not None:
                msg += "; the query itself left out"
            if any(NORMALIZERS[i.normalize].whiten for _, i in parts):
                # the domain's whitening was fitted on those very images: they come out nearly
                # orthogonal to one another, so their scores sit near 0 below every other domain
                msg += (f"; on a per-domain whitened index the scores within {own} are not "
                        "comparable (near 0): choose a plain index to search within a domain")
        return Answer(hits=hits, message=msg, query_domain=used, caption=caption)

    def _parts(self, mode: str, index: str | None, caption_index: str | None, text: bool
               ) -> list[tuple[str, IndexInfo]]:
        """(mode, index) of each score the mode combines."""
        if mode not in MODES:
            raise CdirError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        img = self.info(index) if index else next(iter(self.image_indexes()), None)
        cap = (self.info(caption_index) if caption_index
               else next(iter(self.caption_indexes()), None))
        for name, chosen, info in (("index", index, img), ("caption index", caption_index, cap)):
            if chosen and info is None:
                raise CdirError(f"no up-to-date {name} {chosen!r} in this workspace")
        if (_on_images(mode) or MODES[mode].fuses) and img is None:
            raise CdirError(f"mode {mode} needs an image index: build one with "
                            f"`cdir index build -w {self.ws.root} --encoder SPEC`")
        if not _on_images(mode) and cap is None:
            raise CdirError(f"mode {mode} needs a caption index: caption the gallery (`cdir "
                            f"caption -w {self.ws.root} ...`), then `cdir index build -w "
                            f"{self.ws.root} --captions SOURCE --text-encoder SPEC`")
        if text:
            if MODES[mode].fuses:
                raise CdirError("a text query has no image to fuse: choose visual, cm-text or "
                                "cm-image")
            info = img if _on_images(mode) else cap
            towers = info.caption or parse_spec(info.spec).cross_modal
            if not towers and cap is not None:
                return [("cm-text", cap)]  # the image index has no text tower: the captions do
            if not towers:
                raise CdirError(self.text_note() or f"{info.spec} has no text tower: choose "
                                "a caption index or a CLIP image index")
            return [(mode, info)]
        clip = cap is not None and parse_spec(split_caption_spec(cap.spec)[0]).cross_modal
        if MODES[mode].cross_modal and not clip:
            raise CdirError(f"cm-image needs a caption index of CLIP text embeddings; "
                            f"{cap.spec} is not one: choose cm-text")
        if MODES[mode].fuses:
            return [("visual", img), ("cm-image" if clip and not self.captioner else "cm-text",
                                      cap)]
        return [(mode, img if _on_images(mode) else cap)]

    def _rank(self, key: tuple[str, str], works: list[_Work]
              ) -> list[tuple[dict[str, float], str | None, str | None]]:
        """One batch of queries on one index (what the batcher runs): encoded in one pass,
        normalised and searched as matrices. Per query: (id -> score of its candidates, its
        domain, its generated caption)."""
        import numpy as np

        s = self.searcher(*key)
        if s.domain_bn and key[1] != TEXT:
            raise CdirError(f"{s.spec} embeds with per-domain BatchNorm statistics: search it "
                            "with `cdir search`")
        # a gallery item searched as itself (a click, an upload of its file) has its vector in
        # the index already, transformed as its domain: no model, no normaliser
        stored = ([i for i, w in enumerate(works) if w.item is not None
                   and w.domain == self._row[w.item][1]] if key[1] in ("visual", "cm-text")
                  else [])
        kept = s.index.stored_vectors([works[i].item for i in stored]) if stored else None
        if kept is None:
            stored = []
        fresh = sorted(set(range(len(works))) - set(stored))
        # fresh queries are encoder vectors (wider than the index's under a shared PCA) until
        # normalised; stored ones are already as indexed
        width = s.normalizer.dim if s.normalizer is not None else s.index.dim
        raw = np.zeros((len(works), width), np.float32)
        captions: list[str | None] = [None] * len(works)
        if fresh and key[1] == TEXT:
            raw[fresh] = s.text_vectors([works[i].text.strip() for i in fresh])
        elif fresh:
            vecs, caps = s.query_vectors([works[i].image for i in fresh])
            raw[fresh] = vecs
            for i, c in zip(fresh, caps or [None] * len(fresh), strict=True):
                captions[i] = c
        q = raw if width == s.index.dim else np.zeros((len(works), s.index.dim), np.float32)
        if stored:
            q[stored] = kept
            source = split_caption_spec(s.spec)[1] if _captions_query(key[1]) else None
            for i in stored:
                captions[i] = self.captions(source).get(works[i].item) if source else None
        domains: list[str | None] = [w.domain for w in works]
        if s.normalizer is not None:  # the domain's statistics; the nearest centroid's if unknown
            for rows in ([i for i in fresh if domains[i] is not None],
                         [i for i in fresh if domains[i] is None]):
                if rows:
                    given = [domains[i] for i in rows] if domains[rows[0]] else None
                    q[rows], used = s.normalizer.transform_query(raw[rows], given)
                    for i, d in zip(rows, used, strict=True):
                        domains[i] = str(d)
        unknown = [i for i, (w, d) in enumerate(zip(works, domains, strict=True))
                   if d is None and w.own is None and w.image is not None]
        if unknown:
            for i, d in zip(unknown, self._detect(s, q[unknown]), strict=True):
                domains[i] = d
        own = [w.own or d for w, d in zip(works, domains, strict=True)]
        groups: dict[tuple, list[int]] = {}
        for i, w in enumerate(works):
            targets = self._targets(w.target, own[i], text=w.image is None)
            groups.setdefault(tuple(targets) if targets else (), []).append(i)
        out: list = [None] * len(works)
        for targets, rows in groups.items():
            depth = max(works[i].depth for i in rows)
            res = s.index.search(np.ascontiguousarray(q[rows]), k=depth,
                                 domain=list(targets) or None)
            for j, i in enumerate(rows):
                item = works[i].item
                got = {g: float(v) for g, v in zip(res.ids[j][:works[i].depth],
                                                   res.scores[j][:works[i].depth], strict=True)
                       if g and g != item}
                out[i] = (got, domains[i], captions[i])
        return out

    def _detect(self, s: Searcher, q: np.ndarray) -> list[str | None]:
        """The most common domain among each query's nearest gallery items (label-free: a
        domain is a style, and style is what nearest neighbours share most)."""
        res = s.index.search(q, k=min(DETECT_NEIGHBOURS, len(self.rows)))
        out: list[str | None] = []
        for ids in res.ids:
            doms = [self._row[i][1] for i in ids if i]
            out.append(max(sorted(set(doms)), key=doms.count) if doms else None)
        return out

    def _targets(self, target: str, query_domain: str | None, text: bool) -> list[str] | None:
        if target == ALL_DOMAINS or (target == OTHER_DOMAINS and (text or not query_domain)):
            return None
        if target == OTHER_DOMAINS:
            others = [d for d in self.domains if d != query_domain]
            return others or None
        return [target]

    def _hit(self, rank: int, item: str, score: float, caption_source: str | None) -> Hit:
        path, domain, class_name = self._row[item]
        return Hit(rank, score, item, path, domain, class_name,
                   caption=self.captions(caption_source).get(item) if caption_source else None,
                   thumb=self.thumbnail(path))

    def captions(self, source: str) -> dict[str, str]:
        """id -> caption of a caption source, read once."""
        with self._lock:
            if source not in self._captions:
                from cdir.core.caption_store import CaptionStore

                try:
                    table = CaptionStore(self.ws, source).read()
                    self._captions[source] = dict(zip(table["id"], table["caption"],
                                                      strict=True))
                except (CdirError, OSError, KeyError):
                    self._captions[source] = {}
            return self._captions[source]

    def thumbnail(self, path: str) -> str:
        """The file the page shows for the gallery image ``path``, made once under the
        workspace cache (keyed by the file's path, size and mtime): a copy when the image is
        small, else a JPEG of at most THUMB pixels a side. Only these files are served, so the
        server never needs to read anywhere but this one folder."""
        try:
            st = os.stat(path)
        except OSError:
            return path
        memo = (path, st.st_size, st.st_mtime_ns)
        if memo in self._thumbs:
            return self._thumbs[memo]
        self._thumbs[memo] = out = self._make_thumbnail(path, st)
        return out

    def _make_thumbnail(self, path: str, st: os.stat_result) -> str:
        key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
        suffix = Path(path).suffix.lower()
        for done in (self.thumb_dir / f"{key[:24]}.jpg", self.thumb_dir / f"{key[:24]}{suffix}"):
            if done.exists():
                return str(done.resolve())
        try:
            im = load_image(path)
        except BadImage:
            return path
        self.thumb_dir.mkdir(parents=True, exist_ok=True)
        if max(im.size) <= 2 * THUMB and suffix in (".png", ".jpg", ".jpeg", ".webp", ".gif"):
            out = self.thumb_dir / f"{key[:24]}{suffix}"
            with open(path, "rb") as src, atomic_write(out, "wb") as f:
                shutil.copyfileobj(src, f)
        else:
            out = self.thumb_dir / f"{key[:24]}.jpg"
            im.thumbnail((THUMB, THUMB))
            with atomic_write(out, "wb") as f:
                im.save(f, format="JPEG", quality=88)
        return str(out.resolve())  # absolute: Gradio checks served paths by resolving them


def _fuse(ranked: list[dict[str, float]], weights: list[float]) -> dict[str, float]:
    """Weighted sum of each part's scores over the union of their candidates; an item one part
    did not rank gets that part's lowest ranked score (the most it could have scored)."""
    floor = [min(r.values()) if r else 0.0 for r in ranked]
    ids = set().union(*ranked)
    return {i: sum(w * r.get(i, f) for w, r, f in zip(weights, ranked, floor, strict=True))
            for i in ids}


def _reason(e: BadImage, query: Query) -> str:
    text = str(e)
    prefix = f"{query.path}: "
    return text[len(prefix):] if query.path and text.startswith(prefix) else text
