"""The search stage: a workspace index queried with new images, shared by `cdir search` and the
demo.

An index over image embeddings is queried with the same image encoder. An index over caption
embeddings (``<text encoder>@captions:<source>``) is queried either with the query's own caption,
generated on the fly by the captioner that wrote the gallery's captions (cm-text), or — when the
text encoder is a CLIP — with the query image through the CLIP image tower (cm-image).

A normalised index (`cdir index build --normalize`) holds vectors transformed with per-domain
gallery statistics; a query vector gets the transform of its domain (``query_domain``), or of
the domain whose gallery centroid is nearest when none is given, and that domain is returned.

A compatible query encoder (``query_encoder``: a student of `cdir distill --compatible INDEX`)
encodes the queries instead of the index's encoder: it was trained into the index's space as the
index stores it (after its normalisation), so its vectors are searched as they are (no
normaliser, no per-domain statistics). Its checkpoint records the index it was trained for
(encoder, normalisation, content hash); any other index refuses it.

An index of an image encoder with ``?bn=domain`` (AdaBN) holds vectors embedded with each
domain's own BatchNorm statistics; a query is embedded with those of ``query_domain``, or, when
none is given, once with each domain's and given the domain whose stored-vector centroid is
nearest to the query so embedded (that domain is returned, and normalises it too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cdir.core.errors import CdirError
from cdir.core.workspace import Workspace, split_caption_spec
from cdir.stages.domain_bn import wants_domain_bn
from cdir.stages.modes import MODES, SINGLE_MODES
from encoders.specs import parse_spec

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image


def _check_encoder(ws: Workspace, index: str, encoder: str) -> None:
    """``--encoder`` beside ``--index`` must name that index's encoder (its text encoder for a
    caption index), not be silently ignored."""
    from indexes.meta import index_files, read_meta

    path = ws.index_path(index)
    if not index_files(path).meta.exists():
        return  # open_index says there is no such index
    spec = read_meta(path).encoder_spec
    parts = split_caption_spec(spec)
    if encoder.strip() not in (spec, parts[0] if parts else spec):
        raise CdirError(f"index {index} was built with {spec}, not --encoder {encoder}: drop "
                        f"--encoder, or choose the index of {encoder}")


def compatible_record(spec: str, index: str = "INDEX") -> dict:
    """The index record that query encoder ``spec`` (a ``ckpt:`` student of `cdir distill
    --compatible`) was trained for; refused in one line when it has none (``index``: the index
    it was asked for, for the message)."""
    from encoders.engine.checkpoint import read_file
    from indexes.meta import COMPATIBLE_KEY

    how = (f"train one with `cdir distill rrd -w WORKSPACE --compatible {index}` and pass "
           "ckpt:OUT/student.pt")
    path = parse_spec(spec).checkpoint
    if path is None:
        raise CdirError(f"{spec} is not recorded as compatible with any index: a query "
                        f"encoder is a checkpoint; {how}")
    ckpt = read_file(path)
    record = ckpt.get(COMPATIBLE_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(record, dict) or not record:
        raise CdirError(f"{spec} is not recorded as compatible with any index: {how}")
    return record


@dataclass
class Hit:
    """One search result: its rank (1 = best), cosine score and gallery row; what a caller shows
    beside it (the demo: the caption the search used, a thumbnail) when it has it."""

    rank: int
    score: float
    id: str
    path: str
    domain: str
    class_name: str
    caption: str | None = None
    thumb: str | None = None


class Searcher:
    """One workspace index and the encoders that turn query images into its kind of vector (the
    index by name, by encoder, or the only one; ``mode`` for caption indexes)."""

    def __init__(self, workspace: str, index: str | None = None, encoder: str | None = None,
                 mode: str | None = None, captioner: str | None = None,
                 device: str | None = None, gpu: bool | None = None,
                 allow_missing: bool = False, query_encoder: str | None = None):
        from cdir.stages.index import open_index

        self.ws = Workspace(workspace).require()
        self.manifest = self.ws.manifest().set_index("id", drop=False)
        if index and encoder:
            _check_encoder(self.ws, index, encoder)
        self.index, self.index_name = open_index(self.ws, index, encoder, gpu=gpu,
                                                 named=True)
        self.spec = self.index.meta.encoder_spec
        self._check_coverage(allow_missing)
        self.device = device
        self.text_spec, self.caption_source = split_caption_spec(self.spec) or (None, None)
        if mode and mode not in SINGLE_MODES:
            raise CdirError(f"unknown mode {mode!r}: choose from {', '.join(SINGLE_MODES)}")
        self._check_model()
        if self.caption_source is None:
            self.mode = "visual"
        else:
            default = ("cm-image" if parse_spec(self.text_spec).cross_modal and not captioner
                       else "cm-text")
            self.mode = mode or default
        if mode and mode != self.mode and self.caption_source is None:
            raise CdirError(f"index {self.spec} holds image embeddings: only mode visual applies")
        self.normalizer = self.index.normalizer
        self.normalize = self.index.meta.normalize
        self.query_encoder = query_encoder
        if query_encoder is not None:
            self._check_query_encoder(query_encoder)
            self.normalizer = None  # its vectors are already in the index's normalised space
        if self.normalizer is not None and MODES[self.mode].cross_modal:
            # the statistics are of caption vectors: an image-tower query has others
            raise CdirError(f"index {self.index.meta.encoder_spec} is {self.normalize}-normalised "
                            "with caption statistics: search it with --mode cm-text, or build a "
                            "plain index for cm-image")
        self.captioner_spec = captioner
        self._image_encoder = self._text_encoder = self._captioner = None
        self.domain_bn = (self.caption_source is None and query_encoder is None
                          and wants_domain_bn(self.spec))
        self._bn: tuple[dict, dict] | None = None  # per domain: statistics, unit centroid
        if self.domain_bn:
            self._check_domain_bn()

    def _check_query_encoder(self, spec: str) -> None:
        """Refuse a query encoder that its checkpoint does not record as trained for this
        index (its encoder, normalisation and content), and any on a caption index."""
        from indexes.meta import check_compatible

        if self.caption_source is not None:
            raise CdirError(f"index {self.index_name} holds caption embeddings: a query "
                            "encoder replaces an image encoder only")
        check_compatible(compatible_record(spec, self.index_name), self.index.meta,
                         self.ws.index_path(self.index_name), spec, self.index_name)

    def _check_coverage(self, allow_missing: bool) -> None:
        """An index built over a partial store (``index build --allow-missing``) is refused
        unless ``allow_missing``: its results would silently lack those images."""
        from cdir.stages.index import update_commands
        from cdir.stages.modes import coverage, require_coverage

        self.missing = None
        m = self.index.meta
        ok = self.manifest["id"].astype(str).isin(set(map(str, self.index.ids))).to_numpy()
        if ok.all():
            return
        cov = coverage(self.ws, self.manifest.reset_index(drop=True), self.spec, ok)
        self.missing = cov if cov.n_missing else None
        require_coverage(cov, update_commands(self.ws, self.spec, m.kind, self.index_name,
                                              m.normalize), allow_missing)

    @property
    def infers_domain(self) -> bool:
        """Does a query without ``query_domain`` get a domain (the one `search` returns)?"""
        return self.normalizer is not None or self.domain_bn

    @property
    def domain_transform(self) -> str:
        """What the query's domain decides, for messages: the normaliser and/or BN statistics."""
        return " and ".join([*(["bn=domain statistics"] if self.domain_bn else []),
                             *([self.normalize] if self.normalizer is not None else [])])

    def _check_model(self) -> None:
        """Refuse an index whose encoder now names other weights than its vectors were made with:
        queries encoded by the new weights against the old vectors would be silently wrong. The
        model is not loaded (a file is hashed only when its size or mtime changed)."""
        from encoders.hub import model_identity

        meta = self.index.meta
        model = self.text_spec or self.spec
        current = model_identity(model, hints=meta.model_files)
        if not current.matches(meta.model_id):
            source = (f"--captions {self.caption_source} --text-encoder {model}"
                      if self.caption_source else f"--encoder {model}")
            raise CdirError(
                f"the {meta.kind} index of {meta.encoder_spec} was built from vectors of other "
                f"weights of {model} ({meta.model_id}; it is now "
                f"{current.id}): re-run `cdir embed -w {self.ws.root} {source}` and "
                f"`cdir index build -w {self.ws.root} {source} --type {meta.kind}`")

    def _check_domain_bn(self) -> None:
        """Refuse per-domain statistics that no longer describe the gallery's domains, and an
        index whose vectors are not those embedded with the stored statistics."""
        import shlex

        from cdir.core.store import EmbeddingStore
        from cdir.stages.domain_bn import check_domain_stats
        from cdir.stages.modes import vectors_fingerprint

        meta, root = self.index.meta, str(self.ws.root)
        build = ["cdir", "index", "build", "-w", root, "--encoder", self.spec, "--type", meta.kind,
                 *(["--normalize", meta.normalize] if meta.normalize != "none" else [])]
        rebuild = shlex.join(build)
        rerun = f"{shlex.join(['cdir', 'embed', '-w', root, '--encoder', self.spec])} && {rebuild}"
        check_domain_stats(EmbeddingStore(self.ws.embeddings_dir(self.spec)), self.manifest,
                           rerun)
        stamp = meta.vectors_fingerprint
        if stamp and stamp != vectors_fingerprint(self.ws, self.spec, self.index.ids)[0]:
            raise CdirError(f"the index of {self.spec} holds other vectors than those embedded "
                            f"with the stored BatchNorm statistics: re-run `{rebuild}`")

    def _domain_bn_state(self) -> tuple[dict, dict]:
        """(domain -> stored statistics, domain -> L2-normalised mean of its stored vectors)."""
        import numpy as np

        from cdir.core.store import EmbeddingStore
        from cdir.stages.domain_bn import load_stats

        if self._bn is None:
            store = EmbeddingStore(self.ws.embeddings_dir(self.spec))
            stats = {d: e["stats"] for d, e in load_stats(store.dir).items()}
            x, ok = store.load(self.manifest)
            domains = self.manifest["domain"].astype(str).to_numpy()
            centroids = {}
            for d in sorted(stats):
                rows = ok & (domains == d)
                if rows.any():
                    c = x[rows].mean(0)
                    centroids[d] = c / max(float(np.linalg.norm(c)), 1e-12)
            self._bn = stats, centroids
        return self._bn

    def _domain_bn_vectors(self, images: list[Image.Image], query_domain: str | None
                           ) -> tuple[np.ndarray, list[str]]:
        """The queries embedded with ``query_domain``'s statistics, or each with those of the
        domain whose centroid is nearest to it so embedded; (vectors, the domain of each)."""
        import numpy as np

        stats, centroids = self._domain_bn_state()
        if query_domain is not None:
            if query_domain not in stats:
                raise CdirError(f"no BatchNorm statistics for domain {query_domain!r} in "
                                f"{self.ws.embeddings_dir(self.spec)}: run `cdir embed -w "
                                f"{self.ws.root} --encoder {self.spec}`")
            q = self._encode_images(images, self.spec, stats[query_domain])
            return q, [query_domain] * len(q)
        if not centroids:
            raise CdirError(f"no stored vectors of {self.spec} to infer the query domain from")
        best = best_q = names = None
        for d, c in centroids.items():
            q = self._encode_images(images, self.spec, stats[d])
            score = q @ c
            if best is None:
                best, best_q, names = score, q, np.full(len(q), d, dtype=object)
            else:  # ties keep the first domain (in sorted order)
                better = score > best
                best_q[better], names[better] = q[better], d
                best = np.maximum(score, best)
        return best_q, [str(n) for n in names]

    # -- encoders, loaded on first use -----------------------------------------------------------
    def _encode_images(self, images: list[Image.Image], spec: str,
                       bn_stats: dict | None = None) -> np.ndarray:
        from encoders.image import load_image_encoder

        if self._image_encoder is None:
            self._image_encoder = load_image_encoder(spec, device=self.device)
        if bn_stats is not None:
            self._image_encoder.use_bn_stats(bn_stats)
        return self._image_encoder.encode_images(images)

    def caption(self, images: list[Image.Image]) -> list[str]:
        """The query's own caption, by the captioner that captioned the gallery (or --captioner)."""
        from cdir.core.caption_store import captioner_of_source
        from encoders.captioners import load_captioner

        if self._captioner is None:
            if self.captioner_spec:
                spec, gen = self.captioner_spec, {}
            else:
                source = captioner_of_source(self.ws, self.caption_source)
                if source is None:
                    raise CdirError(f"the captions {self.caption_source!r} were imported, not "
                                    "generated: give --captioner hf:... to caption the query")
                spec, gen = source
            self._captioner = load_captioner(spec, device=self.device, **gen)
        return self._captioner.caption(images)

    def query_vectors(self, images: list[Image.Image]) -> tuple[np.ndarray, list[str] | None]:
        mode = MODES[self.mode]
        if mode.cross_modal:  # the image tower of the CLIP whose text tower made the index
            if not parse_spec(self.text_spec).cross_modal:
                raise CdirError(f"{self.mode} needs an index of CLIP text embeddings of "
                                "captions")
            return self._encode_images(images, self.text_spec), None
        if not mode.captions_query:  # the index's own image encoder, or its compatible one
            return self._encode_images(images, self.query_encoder or self.spec), None
        from encoders.text import load_text_encoder

        captions = self.caption(images)
        if self._text_encoder is None:
            self._text_encoder = load_text_encoder(self.text_spec, device=self.device)
        return self._text_encoder.encode(captions), captions

    def text_vectors(self, texts: list[str]) -> np.ndarray:
        """Text queries as this index's vectors: by its text encoder (a caption index), or by
        the CLIP text tower of a CLIP image index."""
        from encoders.text import load_text_encoder

        spec = self.text_spec or self.spec
        if not parse_spec(spec).cross_modal and self.caption_source is None:
            raise CdirError(f"index {self.spec} holds image embeddings of an encoder without a "
                            "text tower: search text in a caption index or a CLIP index")
        if self._text_encoder is None:
            self._text_encoder = load_text_encoder(spec, device=self.device)
        return self._text_encoder.encode(texts)

    # -- search ------------------------------------------------------------------------------------
    def search(self, images: list[Image.Image], k: int = 10, domain: str | None = None,
               query_domain: str | None = None
               ) -> tuple[list[list[Hit]], list[str] | None, list[str | None]]:
        """(hits per query, the queries' captions for cm-text, the domain whose transform each
        query got: ``query_domain``, or the nearest centroid's on a normalised or ``bn=domain``
        index; None on a plain index without ``query_domain``)."""
        for flag, d in (("domain", domain), ("query domain", query_domain)):
            if d is not None and d not in self.index.domain_names:
                raise CdirError(f"unknown {flag} {d!r}; the index has "
                                f"{', '.join(self.index.domain_names)}")
        used: list[str | None]
        if self.domain_bn:  # the domain is decided here (given or inferred), then normalises
            q, bn_domains = self._domain_bn_vectors(images, query_domain)
            captions, used = None, list(bn_domains)
        else:
            q, captions = self.query_vectors(images)
            used = [query_domain] * len(q)
        if self.normalizer is not None:
            q, names = self.normalizer.transform_query(q, used if self.domain_bn else query_domain)
            used = [str(n) for n in names]
        res = self.index.search(q, k=k, domain=domain)
        out = []
        for scores, ids in zip(res.scores, res.ids, strict=True):
            hits = []
            for rank, (s, id_) in enumerate(zip(scores, ids, strict=True), 1):
                if not id_:
                    continue
                row = self.manifest.loc[id_]
                hits.append(Hit(rank, float(s), id_, str(row["path"]), str(row["domain"]),
                                str(row["class_name"])))
            out.append(hits)
        return out, captions, used
