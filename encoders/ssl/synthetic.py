"""SynCo's synthetic hard negatives, as vectorised pure functions.

Shapes: ``q`` is (B, d) (the *detached* query), ``n`` / ``n2`` are (B, m, d) sampled hard negatives,
every generator returns (B, m, d) **unit** vectors with no autograd history. Random coefficients are
drawn independently per (query, synthetic sample) from ``generator`` (torch's global RNG when
``None``); each generator draws exactly one tensor, of the shape given in its docstring, so a
per-sample reference can reproduce the draws.

| # | generator      | formula (before L2 normalisation)                   | coefficient        |
|---|----------------|-----------------------------------------------------|--------------------|
| 1 | ``interpolate``| a*q + (1 - a)*n                                     | a ~ U(0, 0.5)      |
| 2 | ``extrapolate``| q + b*(n - q)  (code, default) / n + b*(n - q) (paper) | b ~ U(1, 1.5)   |
| 3 | ``mixup``      | g*n + (1 - g)*n2                                    | g ~ U(0, 1)        |
| 4 | ``add_noise``  | n + e, e ~ N(0, sigma^2 I)                          | sigma = 0.01       |
| 5 | ``perturb``    | n + delta * grad_n(q.n) = n + delta*q               | delta = 0.01       |
| 6 | ``adversarial``| n + eta * sign(grad_n(q.n)) = n + eta*sign(q)       | eta = 0.01         |

Types 5 and 6 use the closed form of the gradient (d(q.n)/dn = q) instead of the reference's
per-sample autograd loop. ``perturb_impl="finite_difference"`` reproduces the reference before
commit c214637 (a random probe p ~ N(0, eps^2 I), g = q.p/eps, then n + delta*g*p or
n + eta*sign(g)*p; in effect a copy of n), for anyone reproducing the Aug-Sep 2024 checkpoints.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cdir.core.errors import CdirError

_T = torch.Tensor
_Gen = torch.Generator | None
EXTRAPOLATE_FROM = ("query", "negative")
PERTURB_IMPLS = ("closed_form", "finite_difference")
LOGITS = ("closed_form", "materialize")


def _unit(x: torch.Tensor) -> torch.Tensor:
    """In-place L2 normalisation along the last dim."""
    return x.div_(torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12))


def _uniform(
    shape: tuple[int, ...], lo: float, hi: float, like: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)
    return u.mul_(hi - lo).add_(lo)


def _coef_shape(n: torch.Tensor) -> tuple[int, int, int]:
    return (n.shape[0], n.shape[1], 1)


# In-place kernels: ``n`` is a scratch tensor (B, m, d) that is overwritten with the result. The
# fused ``synthesize`` runs them on slices of its gathered sources, which avoids a temporary per
# type and the final concatenation; the public functions run them on a copy.


def _interpolate_(q: _T, n: _T, alpha_max: float, generator: _Gen) -> _T:
    a = _uniform(_coef_shape(n), 0.0, alpha_max, n, generator)
    return _unit(n.mul_(1.0 - a).addcmul_(a, q.unsqueeze(1)))  # a q + (1 - a) n


def _extrapolate_(
    q: _T, n: _T, beta_max: float, extrapolate_from: str, generator: _Gen
) -> _T:
    if extrapolate_from not in EXTRAPOLATE_FROM:
        raise CdirError(f"extrapolate_from must be one of {EXTRAPOLATE_FROM}, got "
                        f"{extrapolate_from!r}")
    b = _uniform(_coef_shape(n), 1.0, beta_max, n, generator)
    if extrapolate_from == "query":
        return _unit(n.mul_(b).addcmul_(1.0 - b, q.unsqueeze(1)))  # q + b (n - q)
    return _unit(n.mul_(1.0 + b).addcmul_(b, q.unsqueeze(1), value=-1.0))  # n + b (n - q)


def _mixup_(n: _T, n2: _T, gamma_max: float, generator: _Gen) -> _T:
    g = _uniform(_coef_shape(n), 0.0, gamma_max, n, generator)
    return _unit(n.mul_(g).addcmul_(1.0 - g, n2))  # g n + (1 - g) n2


def _add_noise_(n: _T, sigma: float, generator: _Gen) -> _T:
    e = torch.randn(n.shape, generator=generator, device=n.device, dtype=n.dtype)
    return _unit(n.add_(e, alpha=sigma))


def _fd_probe(
    q: _T, n: _T, eps: float, generator: _Gen
) -> tuple[_T, _T]:
    """Legacy finite-difference 'gradient': probe p ~ N(0, eps^2 I) with shape (B, m, d) and the
    directional derivative g = q.p / eps with shape (B, m, 1)."""
    p = torch.randn(n.shape, generator=generator, device=n.device, dtype=n.dtype).mul_(eps)
    g = torch.einsum("bd,bmd->bm", q, p).unsqueeze(-1).div_(eps)
    return p, g


def _perturb_(
    q: _T, n: _T, delta: float, impl: str, fd_eps: float, generator: _Gen
) -> _T:
    if impl == "closed_form":
        return _unit(n.add_(q.unsqueeze(1), alpha=delta))  # n + delta * d(q.n)/dn
    if impl == "finite_difference":
        p, g = _fd_probe(q, n, fd_eps, generator)
        return _unit(n.addcmul_(p, g, value=delta))
    raise CdirError(f"perturb_impl must be one of {PERTURB_IMPLS}, got {impl!r}")


def _adversarial_(
    q: _T, n: _T, eta: float, impl: str, fd_eps: float, generator: _Gen
) -> _T:
    if impl == "closed_form":
        return _unit(n.add_(torch.sign(q).unsqueeze(1), alpha=eta))  # n + eta sign(d(q.n)/dn)
    if impl == "finite_difference":
        p, g = _fd_probe(q, n, fd_eps, generator)
        return _unit(n.addcmul_(p, torch.sign(g), value=eta))
    raise CdirError(f"perturb_impl must be one of {PERTURB_IMPLS}, got {impl!r}")


@torch.no_grad()
def interpolate(
    q: torch.Tensor, n: torch.Tensor, alpha_max: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Type 1: s = a*q + (1-a)*n, a ~ U(0, alpha_max) drawn with shape (B, m, 1)."""
    return _interpolate_(q.detach(), n.detach().clone(), alpha_max, generator)


@torch.no_grad()
def extrapolate(
    q: torch.Tensor, n: torch.Tensor, beta_max: float = 1.5, extrapolate_from: str = "query",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Type 2, b ~ U(1, beta_max) drawn with shape (B, m, 1).

    ``extrapolate_from="query"`` (reference code, default): s = q + b*(n - q), a step of (b - 1)
    beyond n. ``"negative"`` (docstring/paper): s = n + b*(n - q), 1 to 1.5 units beyond n.
    """
    return _extrapolate_(q.detach(), n.detach().clone(), beta_max, extrapolate_from, generator)


@torch.no_grad()
def mixup(
    n: torch.Tensor, n2: torch.Tensor, gamma_max: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Type 3: s = g*n + (1-g)*n2, g ~ U(0, gamma_max) drawn with shape (B, m, 1)."""
    return _mixup_(n.detach().clone(), n2.detach(), gamma_max, generator)


@torch.no_grad()
def add_noise(
    n: torch.Tensor, sigma: float = 0.01, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Type 4: s = n + e, e ~ N(0, sigma^2 I); draws a standard normal with shape (B, m, d)."""
    return _add_noise_(n.detach().clone(), sigma, generator)


@torch.no_grad()
def perturb(
    q: torch.Tensor, n: torch.Tensor, delta: float = 0.01, impl: str = "closed_form",
    fd_eps: float = 1e-5, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Type 5: s = n + delta * grad_n(q.n) = n + delta*q (closed form; draws nothing).

    ``impl="finite_difference"``: s = n + delta*g*p with the legacy probe (draws p, (B, m, d)).
    """
    return _perturb_(q.detach(), n.detach().clone(), delta, impl, fd_eps, generator)


@torch.no_grad()
def adversarial(
    q: torch.Tensor, n: torch.Tensor, eta: float = 0.01, impl: str = "closed_form",
    fd_eps: float = 1e-5, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Type 6: s = n + eta * sign(grad_n(q.n)) = n + eta*sign(q) (closed form; draws nothing).

    ``impl="finite_difference"``: s = n + eta*sign(g)*p with the legacy probe (draws p, (B, m, d)).
    """
    return _adversarial_(q.detach(), n.detach().clone(), eta, impl, fd_eps, generator)


# --------------------------------------------------------------------------------------------
# hard-negative selection and the fused generator


@dataclass
class SyntheticConfig:
    """SynCo synthetic-negative settings; defaults are the reference CLI defaults."""

    n_hard: int = 1024  # N: top-N queue entries per query (--n-hard)
    n1: int = 256  # interpolated
    n2: int = 256  # extrapolated
    n3: int = 256  # mixup
    n4: int = 64  # noise-injected
    n5: int = 64  # perturbed
    n6: int = 64  # adversarial
    alpha_max: float = 0.5  # hard_alpha
    beta_max: float = 1.5  # hard_beta
    gamma_max: float = 1.0  # hard_gamma
    sigma: float = 0.01  # --sigma (history: 0.01 -> 0.1 -> 0.01; v2 uses 0.1)
    delta: float = 0.01  # --delta
    eta: float = 0.01  # --eta
    extrapolate_from: str = "query"  # "query" = reference code, "negative" = paper formula
    perturb_impl: str = "closed_form"  # or "finite_difference" (pre-c214637 reference)
    fd_eps: float = 1e-5
    # "closed_form": the synthetic logits from the queue logits, no synthetic vectors (same
    # values and gradient); "materialize": build the vectors (`synthesize`), then q . s
    logits: str = "closed_form"

    @property
    def counts(self) -> tuple[int, int, int, int, int, int]:
        return (self.n1, self.n2, self.n3, self.n4, self.n5, self.n6)

    @property
    def total(self) -> int:
        """Synthetic negatives per query (960 with the defaults)."""
        return sum(self.counts)

    def validate(self, queue_size: int | None = None) -> None:
        if any(c < 0 for c in self.counts):
            raise CdirError(f"synco: counts n1..n6 must be >= 0, got {self.counts}")
        if self.total > 0:
            if self.n_hard < 1:
                raise CdirError("synco: n_hard must be >= 1 when synthetic negatives are on")
            big = max(self.counts)
            if big > self.n_hard:
                # The reference asserts N >= N_i for every type.
                raise CdirError(f"synco: n_hard ({self.n_hard}) must be >= every count n1..n6 "
                                f"(largest is {big})")
            if queue_size is not None and self.n_hard > queue_size:
                raise CdirError(f"synco: n_hard ({self.n_hard}) exceeds queue_size ({queue_size});"
                                " lower n_hard or grow the queue")
        if self.extrapolate_from not in EXTRAPOLATE_FROM:
            raise CdirError(f"synco: extrapolate_from must be one of {EXTRAPOLATE_FROM}")
        if self.perturb_impl not in PERTURB_IMPLS:
            raise CdirError(f"synco: perturb_impl must be one of {PERTURB_IMPLS}")
        if self.logits not in LOGITS:
            raise CdirError(f"synco: logits must be one of {LOGITS}, got {self.logits!r}")
        if min(self.sigma, self.delta, self.eta, self.fd_eps) < 0:
            raise CdirError("synco: sigma, delta, eta and fd_eps must be >= 0")
        if not (self.alpha_max >= 0 and self.beta_max >= 1 and self.gamma_max >= 0):
            raise CdirError("synco: need alpha_max >= 0, beta_max >= 1, gamma_max >= 0")


def _top_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices (rows, k) of each row's k largest entries, unsorted. On the CPU through
    numpy's introselect, several times faster there than torch.topk (6 against 23 ms for the
    top 1024 of 256 x 8192)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        kth = x.shape[1] - k
        part = np.argpartition(x.numpy(), kth, axis=1)[:, kth:]
        return torch.from_numpy(part.astype(np.int64, copy=False))
    return torch.topk(x, k, dim=1, sorted=False).indices


@torch.no_grad()
def select_hard(neg_logits: torch.Tensor, n_hard: int, group: int = 4) -> torch.Tensor:
    """Indices (B, n_hard) of each query's ``n_hard`` most similar queue entries (unsorted).

    Exact, and faster than one top-k over the whole queue when the hard set is a small part of
    it (N = 1024 of K = 65536). The columns form K / ``group`` groups (group j: columns j,
    j + K/group, ...), so their maxima take one pass over contiguous memory. Every top-N entry
    lies in one of the N groups with the largest maxima: an entry outside them is below N group
    maxima, each an entry of its own. So a top-N over the group maxima, then a top-N over the
    N x ``group`` entries of the chosen groups, is the top-N of the row.
    """
    x = neg_logits.detach().contiguous()
    b, width = x.shape
    k = min(int(n_hard), width)
    g = width // group
    if b == 0:
        return torch.zeros((0, k), dtype=torch.long, device=x.device)
    if k * 2 * group > width:  # the groups would not make the work smaller
        return _top_indices(x, k)
    grouped = x[:, :group * g].view(b, group, g)
    chosen = _top_indices(grouped.amax(1), k)  # (b, k) groups
    values = grouped.gather(2, chosen.unsqueeze(1).expand(b, group, k)).view(b, group * k)
    if width > group * g:  # the last few columns, in no group: candidates as they are
        values = torch.cat([values, x[:, group * g:]], dim=1)
    top = _top_indices(values, k)
    cols = (top // k) * g + chosen.gather(1, top % k)  # values[i] is member i // k of group i % k
    return torch.where(top >= group * k, top - group * k + group * g, cols)  # or from the tail


@torch.no_grad()
def synthesize(
    q: torch.Tensor,
    queue: torch.Tensor,
    hard_idx: torch.Tensor,
    cfg: SyntheticConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """All synthetic negatives of all queries, (B, cfg.total, d), unit-norm, detached.

    Sources are drawn uniformly with replacement from each query's hard set, independently per
    query and synthetic sample (two independent draws for mixup), with one fused draw and one
    gather. Output order along dim 1: types 1..6 with counts n1..n6.

    Draws, in order: source positions (B, n1+n2+n3+n4+n5+n6+n3) laid out as
    [type 1 | type 2 | type 3 first | type 4 | type 5 | type 6 | type 3 second], then the
    coefficients of generators 1..6 in type order. The generators overwrite the gathered sources in
    place, and the result is a view of that buffer (no concatenation).
    """
    q = q.detach()
    b, d = q.shape
    c1, c2, c3, c4, c5, c6 = cfg.counts
    total = cfg.total
    if total == 0:
        return q.new_zeros((b, 0, d))
    n_src = total + c3
    pos = torch.randint(hard_idx.shape[1], (b, n_src), generator=generator, device=q.device)
    rows = hard_idx.gather(1, pos)
    src = queue.detach().index_select(0, rows.reshape(-1)).view(b, n_src, d)
    n1, n2, n3, n4, n5, n6, n3b = src.split([c1, c2, c3, c4, c5, c6, c3], dim=1)
    if c1:
        _interpolate_(q, n1, cfg.alpha_max, generator)
    if c2:
        _extrapolate_(q, n2, cfg.beta_max, cfg.extrapolate_from, generator)
    if c3:
        _mixup_(n3, n3b, cfg.gamma_max, generator)
    # Each type is gated by its own count (the reference swaps the type-4/5 flags).
    if c4:
        _add_noise_(n4, cfg.sigma, generator)
    if c5:
        _perturb_(q, n5, cfg.delta, cfg.perturb_impl, cfg.fd_eps, generator)
    if c6:
        _adversarial_(q, n6, cfg.eta, cfg.perturb_impl, cfg.fd_eps, generator)
    return src[:, :total]


# --------------------------------------------------------------------------------------------
# the synthetic logits in closed form, without the synthetic vectors


def _ratio(num: _T, sq_norm: _T) -> _T:
    return num / sq_norm.clamp_min(1e-24).sqrt()


class _QueueLogits(torch.autograd.Function):
    """Entries ``rows`` (B, m) of the queue logits ``neg`` = q @ queue.T, differentiable in q.

    The gradient is summed from the queue rows themselves (one embedding_bag), not scattered into
    a dense (B, K) gradient of ``neg``: that zero-filled matrix, and its sum with the softmax's
    own gradient of ``neg``, cost more than the whole selection of the hard set.
    """

    @staticmethod
    def forward(ctx, q: _T, neg: _T, queue: _T, rows: _T) -> _T:  # q: what the gradient is for
        ctx.save_for_backward(queue, rows)
        return neg.detach().gather(1, rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: _T) -> tuple[_T, None, None, None]:
        queue, rows = ctx.saved_tensors
        grad_q = F.embedding_bag(rows, queue.detach().to(grad.dtype), mode="sum",
                                 per_sample_weights=grad.contiguous())
        return grad_q, None, None, None


def _row_products(
    queue: _T, rows: _T, counts: tuple[int, ...], e: _T, sign: _T, block_bytes: int = 8 << 20,
) -> tuple[_T, _T, _T]:
    """What the closed form needs of the queue rows themselves: n1.n2 of mixup's pairs (B, n3),
    n.e of the noise type (B, n4) and n.sign(q) of the adversarial type (B, n6), ``rows`` laid
    out as in ``synthesize``. Gathered a block of queries at a time, so that no gathered block
    is larger than ``block_bytes`` (a large temporary costs its page faults on every step)."""
    c3, c4, c6 = counts[2], counts[3], counts[5]
    at = [0, *itertools.accumulate([*counts, c3])]  # where each section of rows starts
    need = torch.cat([rows[:, at[2]:at[3]], rows[:, at[6]:at[7]], rows[:, at[3]:at[4]],
                      rows[:, at[5]:at[6]]], dim=1)  # mixup's two sources, noise, adversarial
    b, m = need.shape
    d = queue.shape[1]
    step = max(1, block_bytes // max(1, m * d * queue.element_size()))
    n12, ne, ns = [], [], []
    for i in range(0, b, step):
        v = queue.index_select(0, need[i:i + step].reshape(-1)).view(-1, m, d)
        n3, n3b, n4, n6 = v.split([c3, c3, c4, c6], dim=1)
        n12.append(torch.linalg.vecdot(n3, n3b))
        ne.append(torch.linalg.vecdot(n4, e[i:i + step]))
        ns.append(torch.bmm(n6, sign[i:i + step].unsqueeze(2)).squeeze(2))
    return torch.cat(n12), torch.cat(ne), torch.cat(ns)


def synthetic_logits(
    q: torch.Tensor,
    neg: torch.Tensor,
    queue: torch.Tensor,
    hard_idx: torch.Tensor,
    cfg: SyntheticConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The logits q.s of every synthetic negative s, (B, cfg.total), with the values and the
    gradient with respect to ``q`` of ``bmm(synthesize(...), q)``, without building s.

    Each s is unit(u) with u a combination of q, the queue rows n and a few random terms, and a
    constant for the loss: its logit is q.u / |u|, where q.u is a combination of q.q_d (q_d the
    detached query; gradient q_d) and q.n, an entry of the queue logits ``neg`` (= q @ queue.T,
    gradient n), and |u| follows from q_d.n (the same entry, detached) and the coefficient.
    Mixup needs n1.n2, noise n.e and q.e, adversarial n.sign(q_d): small gathers. ``q`` and
    the queue rows are unit vectors, as in the loss. The random draws are those of
    ``synthesize``, in its order, so a seeded generator gives the same logits.
    ``perturb_impl="finite_difference"`` has no closed form: use ``synthesize``.
    """
    if cfg.perturb_impl != "closed_form" and (cfg.n5 or cfg.n6):
        raise CdirError("closed-form synthetic logits need perturb_impl='closed_form'")
    qd = q.detach()
    b, d = qd.shape
    counts = cfg.counts
    c1, c2, c3, c4, c5, c6 = counts
    if cfg.total == 0:
        return q.new_zeros((b, 0))
    pos = torch.randint(hard_idx.shape[1], (b, cfg.total + c3), generator=generator,
                        device=qd.device)
    rows = hard_idx.gather(1, pos)  # queue rows of every source, laid out as in synthesize
    ln = _QueueLogits.apply(q, neg, queue, rows)  # q.n, with its gradient n
    l1, l2, l3, l4, l5, l6, l3b = ln.split([*counts, c3], dim=1)
    k1, k2, _, _, k5, _, _ = ln.detach().split([*counts, c3], dim=1)  # q_d.n
    pq = (q * qd).sum(1, keepdim=True)  # q.q_d: value 1, gradient q_d
    # the draws, in synthesize's order
    a = _uniform((b, c1), 0.0, cfg.alpha_max, qd, generator) if c1 else None
    t = _uniform((b, c2), 1.0, cfg.beta_max, qd, generator) if c2 else None
    g = _uniform((b, c3), 0.0, cfg.gamma_max, qd, generator) if c3 else None
    e = torch.randn((b, c4, d), generator=generator, device=qd.device, dtype=qd.dtype)
    sign = torch.sign(qd)
    n12, ne, n_sign = _row_products(queue.detach(), rows, counts, e, sign)

    parts = []
    if c1:  # a q + (1 - a) n
        parts.append(_ratio(a * pq + (1 - a) * l1, a * a + (1 - a) ** 2 + 2 * a * (1 - a) * k1))
    if c2:
        if cfg.extrapolate_from == "query":  # (1 - t) q + t n
            x, y = 1 - t, t
        else:  # (1 + t) n - t q
            x, y = -t, 1 + t
        parts.append(_ratio(x * pq + y * l2, x * x + y * y + 2 * x * y * k2))
    if c3:  # g n1 + (1 - g) n2
        parts.append(_ratio(g * l3 + (1 - g) * l3b, g * g + (1 - g) ** 2 + 2 * g * (1 - g) * n12))
    if c4:  # n + sigma e
        s = cfg.sigma
        qe = torch.bmm(e, q.unsqueeze(2)).squeeze(2)
        parts.append(_ratio(l4 + s * qe, 1 + 2 * s * ne + s * s * e.square().sum(2)))
    if c5:  # n + delta q
        dl = cfg.delta
        parts.append(_ratio(l5 + dl * pq, 1 + 2 * dl * k5 + dl * dl))
    if c6:  # n + eta sign(q)
        et = cfg.eta
        q_sign = (q * sign).sum(1, keepdim=True)
        sq = 1 + 2 * et * n_sign + et * et * (sign * sign).sum(1, keepdim=True)
        parts.append(_ratio(l6 + et * q_sign, sq))
    return torch.cat(parts, dim=1)
