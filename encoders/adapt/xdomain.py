"""``xdomain``: contrastive adaptation with mined cross-domain positives and in-domain negatives.

Each training item is an anchor image and a positive image: with probability ``partner_p`` a
member of the anchor's mined group in another domain (see :mod:`encoders.adapt.groups`), else
the anchor itself (a second view). Both get a style-removing view, both go through the backbone
and a projection head, and a symmetric InfoNCE over the batch pulls each anchor to its positive.

Negatives (``negatives``):
- ``domain`` (default): only the batch items whose positive is in the positive's domain, so an
  object drawn in another style is never a negative and the loss cannot be lowered by encoding
  the domain (DomCLP, DG-UCDIR's per-domain queues);
- ``batch``: every other item of the batch (SimCLR).
Items of the anchor's own mined group are never negatives.

``domain_bn``: the backbone sees each domain's items of a batch as a separate batch, so
BatchNorm normalises with per-domain statistics in training.

``grid``: mining and the loss use the last map (or the maps of ``layers``) average-pooled to
``grid`` x ``grid`` cells (the features of ``ckpt:PATH?grid=N&layers=...``), so training moves
what retrieval with that option reads.

``soft_weight`` > 0 adds a second loss that every image feeds, not only the mined pairs: at each
round the images' ``soft_k`` nearest neighbours in every other domain under the run's
normalisation (per-domain whitening) become a target distribution (softmax at
``soft_teacher_t``), and the plain cosine of an image's features (the ones retrieval reads) to
the round's plain features of the other domains' images (a fixed bank, softmax per domain at
``soft_student_t``) is trained towards it. So the plain features learn the neighbourhoods that
only search-time whitening found, and the next round's whitening starts from there.

``freeze``: the stages up to ``freeze`` keep the starting weights and training runs on their
cached outputs (:mod:`encoders.adapt.cache`): many more steps per CPU hour.

Labels are never read. The method holds the per-image tables it needs as buffers (saved in the
checkpoint, so a resumed run continues with the same groups): ``domain_of`` and ``group_of``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cdir.core.errors import CdirError
from encoders.engine.parts import no_autocast
from encoders.ssl.heads import mlp
from encoders.ssl.moco import SSLMethod

NEGATIVES = {"domain": "only the positive's domain", "batch": "the whole batch"}
GUARDS = {"off": "log the pair-precision estimate only",
          "stop": "end training when it falls (encoder.pt: the best so far)"}


@dataclass
class XDomainConfig:
    dim: int = 128  # projection head output; 0: no head (loss on the backbone features)
    hidden_dim: int | None = None  # None: the backbone feature dim (also with grid)
    temperature: float = 0.1
    partner_p: float = 0.8  # probability that a grouped anchor's positive is a partner
    focus: float = 0.0  # share of anchors drawn from the images that have a partner
    negatives: str = "domain"  # see NEGATIVES
    domain_bn: bool = False
    grid: int = 0  # > 0: features are the last map pooled to grid x grid cells (?grid=N)
    layers: tuple[int, ...] = (4,)  # with grid: the layers pooled (?grid=N&layers=3,4)
    # train only the stages above this one, on cached maps of `cache_views` augmented views of
    # every image (encoders.adapt.cache): none | layer1 | layer2 | layer3
    freeze: str = "none"
    cache_views: int = 8
    # mining, rebuilt every round_epochs epochs (encoders.adapt.groups)
    round_epochs: int = 4
    matcher: str = "mutual-nn"  # a key of encoders.adapt.mining.MATCHERS
    cycle: str | None = "any"  # any | all | null: consistency through a third domain
    both_ways: bool = True
    quantile: float = 0.0  # drop the least confident share of each domain pair's pairs
    min_confidence: float | None = None
    # the pair-quality guard (encoders.adapt.trainer): off | stop
    guard: str = "stop"
    guard_drop: float = 0.05  # fires when the precision estimate falls this far below its best
    guard_floor: float = 0.0  # or below this value
    # the cross-domain neighbour targets (module docstring); 0 turns them off
    soft_weight: float = 0.0
    soft_k: int = 10
    soft_teacher_t: float = 0.05
    soft_student_t: float = 0.1

    def validate(self) -> None:
        if self.negatives not in NEGATIVES:
            raise CdirError(f"xdomain: negatives must be one of {', '.join(NEGATIVES)}, "
                            f"not {self.negatives!r}")
        if self.temperature <= 0 or self.dim < 0:
            raise CdirError("xdomain: temperature and dim must be positive")
        for name in ("partner_p", "focus"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise CdirError(f"xdomain: {name} must be in [0, 1], not {getattr(self, name)}")
        if self.freeze != "none" and self.cache_views < 2:
            raise CdirError(f"xdomain: cache_views must be >= 2, not {self.cache_views}")
        if self.grid < 0:
            raise CdirError(f"xdomain: grid must be >= 0, not {self.grid}")
        if self.grid and self.freeze != "none":
            raise CdirError("xdomain: grid needs freeze=none (cached maps are pooled globally)")
        if self.soft_weight < 0 or self.soft_k < 1:
            raise CdirError("xdomain: soft_weight must be >= 0 and soft_k >= 1")
        if self.soft_teacher_t <= 0 or self.soft_student_t <= 0:
            raise CdirError("xdomain: soft_teacher_t and soft_student_t must be positive")
        if self.soft_weight and self.freeze != "none":
            raise CdirError("xdomain: soft_weight needs freeze=none")
        if self.guard not in GUARDS:
            raise CdirError(f"xdomain: guard must be one of {', '.join(GUARDS)}, "
                            f"not {self.guard!r}")
        if self.round_epochs < 1:
            raise CdirError(f"xdomain: round_epochs must be >= 1, not {self.round_epochs}")


def embed_by_domain(embed: nn.Module, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
    """``embed`` applied to each domain's rows of ``x`` separately (per-domain BN statistics)."""
    out: torch.Tensor | None = None
    for d in torch.unique(domain):
        rows = (domain == d).nonzero(as_tuple=True)[0]
        z = embed(x[rows])
        if out is None:
            out = z.new_empty((len(x), *z.shape[1:]))
        out[rows] = z
    assert out is not None
    return out


class XDomain(SSLMethod):
    """Backbone + MLP head trained on (anchor, positive) views; see the module docstring.

    ``forward(views, idx)``: ``views = [x_anchor, x_positive]``, ``idx`` (B, 2) the global image
    indices of anchor and positive."""

    views = ("strong", "strong")
    takes_index = True

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: XDomainConfig | None = None
                 ) -> None:
        super().__init__()
        self.cfg = cfg or XDomainConfig()
        self.cfg.validate()
        self.encoder_q = backbone
        hidden = self.cfg.hidden_dim or feat_dim
        if self.cfg.grid:
            from encoders.zoo.backbones import GridPooled

            if not hasattr(backbone, "feature_map"):
                raise CdirError("xdomain: grid needs a ResNet backbone of this project")
            pooled = GridPooled(backbone, self.cfg.grid, tuple(self.cfg.layers))
            feat_dim = pooled.out_dim
            # a tuple, so that the backbone is not registered (and saved) twice
            self._grid = (pooled,)
        # dim 0: no head, the loss acts on the backbone features that retrieval uses
        self.head_q = (mlp(feat_dim, hidden, self.cfg.dim)
                       if self.cfg.dim else nn.Identity())
        # (bottom, top) of the backbone when its lower stages are frozen; a tuple, so that the
        # shared modules are not registered (and saved) twice
        self.split: tuple[nn.Module, nn.Module] | None = None
        if self.cfg.freeze != "none":
            from encoders.adapt.cache import split_backbone

            self.split = split_backbone(backbone, self.cfg.freeze)
            for param in self.split[0].parameters():
                param.requires_grad_(False)
        self.feat_dim = feat_dim
        self.register_buffer("domain_of", torch.zeros(0, dtype=torch.long))
        self.register_buffer("group_of", torch.zeros(0, dtype=torch.long))
        # the round's neighbour targets and plain feature bank (soft_weight > 0)
        self.register_buffer("soft_idx", torch.zeros(0, 0, dtype=torch.long))
        self.register_buffer("soft_w", torch.zeros(0, 0))
        self.register_buffer("bank", torch.zeros(0, 0, dtype=torch.float16))

    def retrieval(self) -> nn.Module:
        """The features that mining reads and the loss trains: pooled, or grid-pooled."""
        return self._grid[0] if self.cfg.grid else self.encoder_q

    def scored_options(self) -> str:
        """The ``ckpt:`` spec options under which an encoder file of this run gives the
        features of :meth:`retrieval` (those `cdir eval` must score)."""
        if not self.cfg.grid:
            return ""
        return f"grid={self.cfg.grid}&layers={','.join(map(str, self.cfg.layers))}"

    def set_domains(self, codes: torch.Tensor, names: Sequence[str] | None = None) -> None:
        """Allocate the tables for ``len(codes)`` images (domain codes 0..D-1); every image
        starts in a group of its own. (``names``: unused here.)"""
        codes = torch.as_tensor(codes, dtype=torch.long, device=self.domain_of.device)
        self.domain_of = codes.clone()
        self.group_of = torch.arange(len(codes), device=codes.device)
        if self.cfg.soft_weight:
            n, width = len(codes), self.cfg.soft_k * max(int(codes.max()), 1)
            self.soft_idx = torch.zeros(n, width, dtype=torch.long, device=codes.device)
            self.soft_w = torch.zeros(n, width, device=codes.device)
            self.bank = torch.zeros(n, self.feat_dim, dtype=torch.float16, device=codes.device)

    def set_groups(self, groups: torch.Tensor) -> None:
        self.group_of.copy_(torch.as_tensor(groups, dtype=torch.long))

    def set_soft(self, idx: torch.Tensor, w: torch.Tensor, bank: torch.Tensor) -> None:
        """The round's targets (:func:`encoders.adapt.mining.soft_neighbours`, global rows) and
        the plain features of every image (L2 rows; zeros for unreadable images)."""
        self.soft_idx.copy_(torch.as_tensor(idx))
        self.soft_w.copy_(torch.as_tensor(w))
        self.bank.copy_(torch.as_tensor(bank))

    def _embed(self, x: torch.Tensor, domain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(head outputs, retrieval features) of images, or of cached maps when the lower
        stages are frozen."""
        trunk = self.retrieval() if self.split is None else self.split[1]
        if self.cfg.domain_bn:
            feats = embed_by_domain(trunk, x, domain)
            return embed_by_domain(self.head_q, feats, domain), feats
        feats = trunk(x)
        return self.head_q(feats), feats

    def soft_loss(self, feats: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the targets of images ``rows`` against the softmax, per other
        domain, of their features' cosine to the bank (module docstring)."""
        logits = F.normalize(feats.float(), dim=1) @ self.bank.float().T / self.cfg.soft_student_t
        n_dom = int(self.domain_of.max()) + 1
        lse = torch.stack([torch.logsumexp(logits[:, self.domain_of == d], 1)
                           for d in range(n_dom)], 1)
        idx = self.soft_idx[rows]
        logp = logits.gather(1, idx) - lse.gather(1, self.domain_of[idx])
        return -(self.soft_w[rows] * logp).sum(1).mean()

    def forward(self, views: list[torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        x_a, x_p = views
        idx = idx.to(self.domain_of.device)
        a, p = idx[:, 0], idx[:, 1]
        dom_a, dom_p = self.domain_of[a], self.domain_of[p]
        q, f_a = self._embed(x_a, dom_a)
        k, f_p = self._embed(x_p, dom_p)
        with no_autocast(q.device):
            q = F.normalize(q.float(), dim=1)
            k = F.normalize(k.float(), dim=1)
            rows_qk, rows_kq, hit = pair_losses(q, k, dom_a, dom_p, self.group_of[a],
                                                self.cfg.temperature, self.cfg.negatives)
            loss = 0.5 * (rows_qk.mean() + rows_kq.mean())
            out = {}
            if self.cfg.soft_weight:
                soft = 0.5 * (self.soft_loss(f_a, a) + self.soft_loss(f_p, p))
                loss = loss + self.cfg.soft_weight * soft
                out["soft"] = soft.detach()
        with torch.no_grad():
            return {"loss": loss, **out, "acc1": hit.float().mean(),
                    "cross_share": (dom_a != dom_p).float().mean(),
                    "pos_sim": (q * k).sum(1).mean()}


def pair_losses(q: torch.Tensor, k: torch.Tensor, dom_a: torch.Tensor, dom_p: torch.Tensor,
                group: torch.Tensor, temperature: float, negatives: str = "domain"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row InfoNCE of anchors ``q`` against positives ``k`` (row i's positive is k[i]) and
    back, with the masks of the module docstring; returns (losses q->k, losses k->q, hits)."""
    same = group[:, None] == group[None, :]
    eye = torch.eye(len(q), dtype=torch.bool, device=q.device)
    drop = same & ~eye  # the anchor's own group: neither positive nor negative
    drop_qk = drop_kq = drop
    if negatives == "domain":
        drop_qk = drop | (dom_p[:, None] != dom_p[None, :])
        drop_kq = drop | (dom_a[:, None] != dom_a[None, :])
    sim = q @ k.T / temperature
    target = torch.arange(len(q), device=q.device)
    logits = sim.masked_fill(drop_qk, float("-inf"))
    rows_qk = F.cross_entropy(logits, target, reduction="none")
    rows_kq = F.cross_entropy(sim.T.masked_fill(drop_kq, float("-inf")), target,
                              reduction="none")
    return rows_qk, rows_kq, logits.argmax(1) == target
