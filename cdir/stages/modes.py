"""Retrieval modes: which vectors score a query against the gallery, and how modes are fused.

- ``visual``:   query image ↔ gallery image, any image encoder (``--encoder``).
- ``cm-text``:  query caption ↔ gallery caption, both through a text encoder (``--text-encoder``).
- ``cm-image``: query image (CLIP image tower) ↔ gallery caption (the same CLIP's text tower), the
                Caption-Matching paper's first formulation (``--clip``).
- ``fusion``:   a weighted sum of per-query standardised similarities of several modes
                (``zscore``), or reciprocal-rank fusion (``rrf``).

Every mode is a scorer over manifest rows (see ``eval.topk``), so the same blockwise top-k, index
and evaluation code serves all of them. numpy is imported inside the functions: the command line
reads `MODES` while it builds its parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cdir.core.errors import CdirError
from eval.rerank import DEFAULT_CSLS_K, DEFAULT_DUAL_SOFTMAX_BETA

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from cdir.core.store import EmbeddingStore
    from cdir.core.workspace import Workspace
    from encoders.hub import ModelId
    from eval.fusion import FusionScorer
    from eval.topk import CosineScorer
    from indexes.normalize import DomainNormalizer


@dataclass(frozen=True)
class Mode:
    """What a mode scores with. ``model``: the `ModeConfig` field naming its model (None for
    fusion, which combines the others); ``query`` / ``gallery``: "image" or "caption" vectors of
    that model; ``needs``: how to give the model; ``about``: one line for reports;
    ``report_row``: its place among a reproduction's rows (the CM paper's own first)."""

    model: str | None
    query: str
    gallery: str
    needs: str
    about: str
    report_row: int

    @property
    def captions(self) -> bool:
        """Does the mode read a caption source?"""
        return "caption" in (self.query, self.gallery)

    @property
    def captions_query(self) -> bool:
        """Is a query image captioned at query time (its caption is the query's vector)?"""
        return self.query == "caption"

    @property
    def fuses(self) -> bool:
        """Does the mode combine the scores of the single modes (it has no model of its own)?"""
        return self.model is None

    @property
    def cross_modal(self) -> bool:
        """Are its query vectors of another kind than the gallery's (an image against
        captions)?"""
        return self.query != self.gallery


MODES: dict[str, Mode] = {
    "visual": Mode(
        "encoder", "image", "image", "--encoder",
        "query image against gallery images with an image encoder (CM v1's CLIP image-to-image "
        "ablation when the encoder is CLIP)", report_row=2),
    "cm-text": Mode(
        "text_encoder", "caption", "caption", "--text-encoder (e.g. st:all-MiniLM-L6-v2)",
        "query caption against gallery captions, both through a text encoder "
        "(caption-to-caption; a variant the later CM versions may use, unverified)",
        report_row=1),
    "cm-image": Mode(
        "clip", "image", "caption", "--clip (a clip: spec with image and text towers)",
        "query image (CLIP image tower) against the gallery's captions (the same CLIP's text "
        "tower): the CM paper's image-to-caption matching", report_row=0),
    "fusion": Mode(
        None, "fused", "fused", "two single modes",
        "weighted sum of per-query standardised scores of the modes named", report_row=3),
}
SINGLE_MODES = tuple(m for m, spec in MODES.items() if spec.model)  # the modes fusion combines


@dataclass
class ModeConfig:
    encoder: str | None = None  # image encoder of `visual`
    text_encoder: str | None = None  # text encoder of `cm-text`
    clip: str | None = None  # CLIP of `cm-image` (image tower for queries, text tower for captions)
    captions: str | None = None  # caption source key
    fusion: tuple[str, ...] = ()  # the modes fused; default: every other mode that is configured
    weights: dict[str, float] = field(default_factory=dict)
    fusion_method: str = "zscore"


def model_check(store: EmbeddingStore, spec: str) -> tuple[bool, str | None, ModelId]:
    """Is ``spec`` still the model whose vectors ``store`` holds? Returns (same, the identity
    recorded at embed time, the identity now). The model is not loaded: a checkpoint is hashed
    only when its size or mtime differ from the store's record (`encoders.hub.model_identity`).
    When it is the same model, the store's record is refreshed (an identity written by an older
    cdir upgraded, a touched file's new mtime noted) so the next check is cheap."""
    from encoders.hub import model_identity

    info = store.info()
    params = info.get("params") or {}
    recorded = params.get("weights")
    current = model_identity(spec, hints=info.get("weights_files"))
    same = current.matches(recorded)
    if same and info and current.id is not None and (
            recorded != current.id or info.get("weights_files") != current.files):
        store.update_info(params={**params, "weights": current.id},
                          weights_files=current.files)
    return same, recorded, current


def current_rows(store: EmbeddingStore, ids: list[str], versions: list[str | None]
                 ) -> tuple[set[str], list[str]]:
    """(ids whose stored vector was computed from what the row holds now, ids stored but computed
    from something else: a changed image or caption). ``versions``: what each of ``ids`` holds
    now (None: unknown). Rows stored before rows were versioned are taken as current and get the
    present versions recorded, so a later change is noticed."""
    from cdir.core.store import same_version

    have = store.versions()
    if any(v is None for v in have.values()) and any(v is not None for v in versions):
        store.adopt_versions(dict(zip(ids, versions, strict=True)))
        have = store.versions()
    fresh, stale = set(), []
    for i, v in zip(ids, versions, strict=True):
        if i in have:
            if same_version(have[i], v):
                fresh.add(i)
            else:
                stale.append(i)
    return fresh, stale


def _checked(store: EmbeddingStore, model: str, ids: list[str], versions: list[str | None],
             what: str, rows: str, rerun: str) -> None:
    """Refuse, in one line saying what to re-run, vectors of other weights or of rows that
    changed since they were embedded: never serve them."""
    same, recorded, current = model_check(store, model)
    if not same:
        raise CdirError(f"the {what} in {store.dir} were made by other weights of {model} "
                        f"({recorded}; it is now {current.id}): re-run `{rerun}`")
    _, stale = current_rows(store, ids, versions)
    if stale:
        raise CdirError(f"{len(stale)} {rows} changed since they were embedded "
                        f"(e.g. {stale[0]!r}): re-run `{rerun}`")


@dataclass
class Coverage:
    """How far the stored vectors of ``spec`` cover the manifest rows: ``missing`` (per domain)
    are rows a cdir run would still fill (not embedded yet: `cdir embed --limit`, a killed or a
    running embed, a grown gallery); ``skipped`` rows never get a vector (unreadable images,
    images a caption source does not cover) and are reported, not missing. ``running``: the lock
    record of an embed writing the store now."""

    spec: str
    total: int
    missing: dict[str, int]
    skipped: int
    running: dict | None = None

    @property
    def n_missing(self) -> int:
        return sum(self.missing.values())

    def describe(self) -> str:
        per = ", ".join(f"{d} {n}" for d, n in self.missing.items())
        return f"{self.n_missing} of {self.total} images have no {self.spec} vector yet ({per})"


def coverage(ws: Workspace, manifest: pd.DataFrame, spec: str, ok: np.ndarray | None = None
             ) -> Coverage:
    """The `Coverage` of ``manifest`` by the embeddings of ``spec`` (an image encoder or a
    `caption_spec`); ``ok``: the rows that have a vector where the caller knows them (an index's
    rows), else those in the store."""
    import numpy as np

    from cdir.core.caption_store import CaptionStore
    from cdir.core.lock import beside, running
    from cdir.core.store import EmbeddingStore
    from cdir.core.workspace import split_caption_spec

    store = EmbeddingStore(ws.embeddings_dir(spec))
    ids = manifest["id"].astype(str)
    if ok is None:
        ok = ids.isin(store.done_ids()).to_numpy()
    parts = split_caption_spec(spec)
    if parts is None:
        unfillable = {str(r["id"]) for r in store.failed()}
    else:
        captions = CaptionStore(ws, parts[1])
        meta = captions.meta()
        if meta.get("kind") == "model":
            unfillable = {str(r["id"]) for r in meta.get("failed", [])}
        else:
            unfillable = set(ids[captions.aligned(manifest).isna().to_numpy()])
    skipped = ~ok & ids.isin(unfillable).to_numpy()
    gaps = ~ok & ~skipped
    domains = manifest["domain"].astype(str).to_numpy()[gaps]
    names, counts = np.unique(domains, return_counts=True)
    return Coverage(spec, len(manifest), dict(zip(names.tolist(), counts.tolist(), strict=True)),
                    int(skipped.sum()), running(beside(store.dir)))


def require_coverage(cov: Coverage, fill: str, allow_missing: bool) -> None:
    """Refuse, in one line, vectors that do not cover the gallery (``fill``: the command that
    completes them), unless ``allow_missing``: a partial store must never pass as a whole one."""
    if not cov.n_missing or allow_missing:
        return
    holder = cov.running
    if holder is not None:
        since = f", started {holder['since'].replace('T', ' ')}" if holder.get("since") else ""
        raise CdirError(f"an embed of {cov.spec} is still running (pid {holder['pid']}{since}): "
                        f"{cov.describe()} so far; wait for it to finish, or pass "
                        "--allow-missing to use the rows stored so far")
    raise CdirError(f"the {cov.spec} embeddings are partial: {cov.describe()}; complete them "
                    f"with `{fill}`, or pass --allow-missing to go on without them")


def image_vectors(ws: Workspace, manifest: pd.DataFrame, spec: str, lazy: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(vectors in manifest order, valid rows) of the image embeddings of ``spec``; refused when
    ``spec`` now names other weights or an image changed since it was embedded (or, with
    ``?bn=domain``, a row was embedded with other statistics than its domain's stored ones).
    ``lazy``: the vectors of the valid rows only, as a `StoredRows` view read from disk on
    demand, not loaded (`EmbeddingStore.rows`)."""
    from cdir.core.manifest import row_versions
    from cdir.core.store import EmbeddingStore
    from cdir.stages.domain_bn import check_domain_stats, wants_domain_bn

    store = EmbeddingStore(ws.embeddings_dir(spec))
    rerun = f"cdir embed -w {ws.root} --encoder {spec}"
    if not store.exists():
        raise CdirError(f"no image embeddings for {spec} in {ws.root}: run `{rerun}` first")
    _checked(store, spec, manifest["id"].astype(str).tolist(), row_versions(manifest),
             "image embeddings", "image(s)", rerun)
    if wants_domain_bn(spec):  # each row with the statistics stored for its domain
        check_domain_stats(store, manifest, rerun, current=False)
    return store.rows(manifest) if lazy else store.load(manifest)


def caption_vectors(ws: Workspace, manifest: pd.DataFrame, captions: str | None,
                    text_spec: str, lazy: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Like `image_vectors`, for the embeddings of a caption source by ``text_spec`` (refused
    also when a caption was rewritten since it was embedded)."""
    from cdir.core.caption_store import (
        CaptionStore,
        caption_embeddings_dir,
        caption_versions,
        resolve_source,
    )
    from cdir.core.store import EmbeddingStore

    key = resolve_source(ws, captions)
    store = EmbeddingStore(caption_embeddings_dir(ws, key, text_spec))
    rerun = f"cdir embed -w {ws.root} --captions {key} --text-encoder {text_spec}"
    if not store.exists():
        raise CdirError(f"no embeddings of the captions {key!r} with {text_spec}: run `{rerun}`")
    texts = CaptionStore(ws, key).aligned(manifest)
    _checked(store, text_spec, manifest["id"].astype(str).tolist(), caption_versions(texts),
             "caption embeddings", "caption(s)", rerun)
    return store.rows(manifest) if lazy else store.load(manifest)


def vectors_fingerprint(ws: Workspace, spec: str, ids: list[str]) -> tuple[str, str | None, dict]:
    """(fingerprint, model identity, its hash records) of the stored vectors of ``ids`` for
    ``spec`` (an image encoder or a `caption_spec`), as an index built from them records: the
    fingerprint changes when the model's weights or any of those rows' vectors were re-made.
    Call it after `image_vectors` / `caption_vectors` checked the store."""
    import hashlib

    from cdir.core.store import EmbeddingStore

    store = EmbeddingStore(ws.embeddings_dir(spec))
    info = store.info()
    model = (info.get("params") or {}).get("weights")
    versions = store.versions()
    h = hashlib.sha256(f"{spec}\x1f{model}".encode())
    for i in ids:
        h.update(f"\x1e{i}\x1f{versions.get(i)}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16], model, info.get("weights_files") or {}


def configured_modes(cfg: ModeConfig) -> list[str]:
    """The single modes the configuration provides vectors for."""
    return [m for m in SINGLE_MODES if getattr(cfg, MODES[m].model)
            and (cfg.captions is not None or not MODES[m].captions)]


def mode_models(mode: str, cfg: ModeConfig) -> list[str]:
    """The model specs a mode scores with (every configured one for fusion)."""
    return [spec for m in SINGLE_MODES if mode in (m, "fusion")
            for spec in [getattr(cfg, MODES[m].model)] if spec]


def mode_vectors(ws: Workspace, manifest: pd.DataFrame, mode: str, cfg: ModeConfig
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query vectors, gallery vectors, valid rows) of a single mode."""
    if mode not in SINGLE_MODES:
        raise CdirError(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
    m = MODES[mode]
    spec = getattr(cfg, m.model)
    if not spec:
        raise CdirError(f"mode {mode} needs {m.needs}")

    def vectors(kind: str) -> tuple[np.ndarray, np.ndarray]:
        if kind == "image":
            return image_vectors(ws, manifest, spec)
        return caption_vectors(ws, manifest, cfg.captions, spec)

    q, ok = vectors(m.query)
    if m.gallery == m.query:
        return q, q, ok
    g, ok_g = vectors(m.gallery)
    return q, g, ok & ok_g


def gallery_normalizer(x: np.ndarray, domains: np.ndarray, method: str,
                       dim: int | None = None) -> DomainNormalizer | None:
    """The normaliser of a workspace's vectors, the one place it is built (index build, eval):
    ``method`` (a key of `indexes.normalize.NORMALIZERS`) fitted without labels on the gallery
    rows ``x`` and their manifest ``domains``, after a shared PCA to ``dim`` dims (None: the
    default of `indexes.normalize.resolve_pca_dim`, 0: none); None for "none" (the stored unit
    vectors stay)."""
    from indexes.normalize import DomainNormalizer, resolve_pca_dim

    pca = resolve_pca_dim(method, int(x.shape[1]), dim)[0]
    norm = DomainNormalizer(method, pca_dim=pca)  # refuses an unknown name ("none" included)
    return None if method == "none" else norm.fit(x, domains)


def vectors_scorer(q: np.ndarray, g: np.ndarray | None, domains: np.ndarray,
                   normalize: str = "none", rerank: str = "none", csls_k: int = DEFAULT_CSLS_K,
                   device: str | None = None, normalize_dim: int | None = None,
                   beta: float = DEFAULT_DUAL_SOFTMAX_BETA
                   ):  # noqa: ANN201 - a scorer of eval.topk
    """The scorer of unit query vectors ``q`` against gallery vectors ``g`` (None: ``q`` itself)
    of the same rows, whose manifest domains are ``domains``: per-domain ``normalize`` fitted on
    those rows, then cosine, then ``rerank``. Every single mode is scored through here (the
    evaluate stage; the training monitor, so that it logs what `cdir eval` prints)."""
    from eval.rerank import RERANKERS
    from eval.topk import CosineScorer

    if rerank not in RERANKERS:
        raise CdirError(f"unknown rerank {rerank!r}: choose from {', '.join(RERANKERS)}")
    gallery = q if g is None else g
    norm = gallery_normalizer(gallery, domains, normalize, normalize_dim)
    if norm is not None:
        gallery = norm.transform(gallery, domains)
        # query vectors of another tower (cm-image) get statistics of their own
        q = gallery if g is None else gallery_normalizer(
            q, domains, normalize, normalize_dim).transform(q, domains)
    return RERANKERS[rerank].build(
        CosineScorer(q, None if g is None else gallery, device=device), domains, csls_k, beta)


def build_scorer(ws: Workspace, manifest: pd.DataFrame, mode: str, cfg: ModeConfig,
                 device: str | None = None, normalize: str = "none", rerank: str = "none",
                 csls_k: int = DEFAULT_CSLS_K, normalize_dim: int | None = None,
                 beta: float = DEFAULT_DUAL_SOFTMAX_BETA
                 ) -> tuple[CosineScorer | FusionScorer, np.ndarray]:
    """A scorer for ``mode`` over the rows that have every vector it needs.

    ``normalize``: the vectors are first normalised per domain with statistics fitted on all
    the scored rows (transductive, no labels), after a shared PCA to ``normalize_dim`` (see
    `gallery_normalizer`); ``rerank``: a key of `eval.rerank.RERANKERS`
    (``csls`` with neighbourhood ``csls_k``, ``dual-softmax`` with ``beta``), applied to each
    single mode's cosine scores.
    Returns (scorer, valid): rows without vectors (unreadable images, missing captions) are left
    out; the scorer is indexed by positions in ``manifest[valid]``.
    """
    import numpy as np

    all_domains = manifest["domain"].astype(str).to_numpy()

    def scorer(q: np.ndarray, g: np.ndarray, ok: np.ndarray):
        return vectors_scorer(q[ok], None if q is g else g[ok], all_domains[ok], normalize,
                              rerank, csls_k, device, normalize_dim, beta)

    if mode != "fusion":
        q, g, ok = mode_vectors(ws, manifest, mode, cfg)
        return scorer(q, g, ok), ok
    parts = list(cfg.fusion) or configured_modes(cfg)
    if len(parts) < 2:
        raise CdirError("fusion needs at least two modes: give --encoder and --captions with "
                        "--text-encoder and/or --clip, or --fuse MODE,MODE")
    vecs = [mode_vectors(ws, manifest, m, cfg) for m in parts]
    ok = np.logical_and.reduce([v[2] for v in vecs])
    scorers = [scorer(q, g, ok) for q, g, _ in vecs]
    weights = [cfg.weights.get(m, 1.0) for m in parts]
    from eval.fusion import FusionScorer

    return FusionScorer(scorers, weights, cfg.fusion_method), ok


def parse_weights(text: str | None) -> dict[str, float]:
    """'visual=0.3,cm-text=0.7' → {'visual': 0.3, 'cm-text': 0.7}."""
    out: dict[str, float] = {}
    for part in filter(None, (text or "").split(",")):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise CdirError(f"bad weight {part!r}: use MODE=NUMBER, e.g. visual=0.3") from None
        if not sep or name.strip() not in SINGLE_MODES:
            raise CdirError(f"bad weight {part!r}: modes are {', '.join(SINGLE_MODES)}")
    return out
