"""CRD, Contrastive Representation Distillation: the paper's loss with momentum memory banks
(``crd``), and the FIFO-queue InfoNCE variant the DCD/RRD code calls crd (``crd_fifo``).

``crd`` (Tian et al.; RepDistiller's defaults): two memory banks of n_data x 128, one of student
and one of teacher embeddings, initialised uniformly in +-1/sqrt(d/3). For each sample i the
rows ``[idx_i, K negatives]`` (K = 16384; ``contrast_idx`` when the data set supplies them)
of the *other* side's bank are scored as exp(v . m / T) / Z (T = 0.07;
Z = mean score x n_data, fixed from the first batch) and fed to NCE with the noise
distribution 1/n_data (eps 1e-7); the loss is the student-anchored plus the teacher-anchored
term. After scoring, each bank's rows ``idx`` move towards the new embeddings:
m <- normalise(0.5 m + 0.5 v). Under DDP the update uses the whole global batch, so every
rank's banks stay the same.

Negatives, drawn with replacement when no ``contrast_idx`` is given: with labels (the labelled
testbed, :meth:`CRDLoss.set_labels`), uniformly from the rows of the *other* classes, as
RepDistiller's contrastive sampler does, so an anchor never contrasts with its own class (nor
its own row); without labels, uniformly from every row but the anchor's own (its own row would
be its positive scored as noise; other rows of its class cannot be told apart without labels).

``crd_fifo``: InfoNCE of the student embedding against its own teacher embedding (positive)
and a FIFO queue of past teacher embeddings (negatives), T = 0.07. By default the batch is
enqueued after the loss, so no sample meets its own key among the negatives; the DCD/RRD
reference enqueues before (``enqueue_before_loss=True`` reproduces that).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cdir.core.dist import broadcast, concat_all_gather
from cdir.core.errors import CdirError
from encoders.distill.losses.base import ProjectionLoss, check_positive
from encoders.distill.losses.memory import QueueLoss
from encoders.engine.parts import infonce_logits, infonce_loss

NCE_EPS = 1e-7


def nce_loss(scores: torch.Tensor, n_data: int) -> torch.Tensor:
    """CRD's NCE on (B, 1 + K) normalised scores, positive first: the positive should be told
    from noise drawn with probability K / n_data, and so should each negative."""
    b, k = scores.shape[0], scores.shape[1] - 1
    noise = k / float(n_data)
    log_pos = torch.log(scores[:, 0] / (scores[:, 0] + noise + NCE_EPS))
    log_neg = torch.log(noise / (scores[:, 1:] + noise + NCE_EPS))
    return -(log_pos.sum() + log_neg.sum()) / b


class ContrastMemory(nn.Module):
    """The two momentum banks (buffers ``bank_s``, ``bank_t``) and the normalisation constants
    (``z_s``, ``z_t``: -1 until the first training batch sets them)."""

    def __init__(self, dim: int, n_data: int, k: int, temperature: float = 0.07,
                 momentum: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        self.n_data, self.k = int(n_data), int(k)
        self.temperature, self.momentum = float(temperature), float(momentum)
        # a fixed seed: every rank of a DDP run starts from the same banks
        g = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(dim / 3)
        for name in ("bank_s", "bank_t"):
            self.register_buffer(name, (torch.rand(n_data, dim, generator=g) * 2 - 1) * bound)
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        # the negative sampler (not checkpointed: set again from the data): the rows grouped by
        # class (``order``), and where each row's class starts in it and how many it has;
        # without labels every row is its own group, so only the anchor's row is excluded
        self.register_buffer("order", torch.arange(self.n_data), persistent=False)
        self.register_buffer("group_start", torch.arange(self.n_data), persistent=False)
        self.register_buffer("group_size", torch.ones(self.n_data, dtype=torch.long),
                             persistent=False)

    def set_labels(self, labels: torch.Tensor | None) -> None:
        """Draw each anchor's negatives from the other classes of ``labels`` (one per row);
        ``None``: from every row but the anchor's."""
        dev = self.order.device
        if labels is None:
            self.order = torch.arange(self.n_data, device=dev)
            self.group_start = torch.arange(self.n_data, device=dev)
            self.group_size = torch.ones(self.n_data, dtype=torch.long, device=dev)
            return
        labels = torch.as_tensor(labels).long().reshape(-1).cpu()
        if labels.numel() != self.n_data:
            raise CdirError(f"crd: {labels.numel()} labels for a memory of {self.n_data} rows")
        _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        if int(counts.max()) == self.n_data:
            raise CdirError("crd: every training image has the same label, so there is no other "
                            "class to draw negatives from")
        starts = torch.cumsum(counts, 0) - counts
        self.order = torch.sort(inverse, stable=True).indices.to(dev)
        self.group_start = starts[inverse].to(dev)
        self.group_size = counts[inverse].to(dev)

    def rows(self, idx: torch.Tensor, contrast_idx: torch.Tensor | None) -> torch.Tensor:
        """(B, 1 + K) bank rows to score: ``contrast_idx`` as given, or ``idx`` followed by K
        draws outside the anchor's group (its class, or its own row without labels)."""
        b = idx.shape[0]
        if contrast_idx is not None:
            if contrast_idx.shape != (b, self.k + 1):
                raise CdirError(f"crd: contrast_idx must be (batch, 1 + K) = ({b}, "
                                f"{self.k + 1}), got {tuple(contrast_idx.shape)}")
            return contrast_idx.long()
        idx = idx.long().to(self.order.device)
        start = self.group_start[idx].unsqueeze(1)
        size = self.group_size[idx].unsqueeze(1)
        # a uniform position among the n - size rows outside the group, skipping over it in
        # ``order`` (the modulo's bias, n / 2**62, is far below anything measurable)
        draw = torch.randint(0, 2 ** 62, (b, self.k), device=idx.device) % (self.n_data - size)
        pos = draw + size * (draw >= start)
        return torch.cat([idx.unsqueeze(1), self.order[pos]], dim=1)

    def _score(self, bank: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
               z: torch.Tensor) -> torch.Tensor:
        if rows.numel() > bank.shape[0]:
            # more rows drawn than the bank has (CIFAR: 64 x 16385 vs 50000): score the whole
            # bank once and pick, instead of copying B x (1 + K) rows of it (same values; the
            # bank is a constant, so the gradient reaches v alike; the clone keeps the bank
            # as scored for the backward pass, since the update after this changes it)
            dots = torch.gather(v @ bank.t().clone(), 1, rows)
        else:
            w = bank.index_select(0, rows.reshape(-1)).view(*rows.shape, -1)  # a copy
            dots = torch.bmm(w, v.unsqueeze(2)).squeeze(2)
        out = torch.exp(dots / self.temperature)
        if z < 0:
            value = out.detach().mean() * self.n_data
            if not self.training:  # eval changes no state: normalise by this batch alone
                return out / value
            z.copy_(broadcast(value))  # rank 0's constant, so every rank divides alike
        return out / z

    def forward(self, v_s: torch.Tensor, v_t: torch.Tensor, idx: torch.Tensor,
                contrast_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (student anchor vs teacher bank, teacher anchor vs student bank), each
        (B, 1 + K); in training mode the banks are then updated at ``idx``."""
        rows = self.rows(idx, contrast_idx)
        out_s = self._score(self.bank_t, v_s, rows, self.z_s)
        out_t = self._score(self.bank_s, v_t, rows, self.z_t)
        if self.training:
            self.update(v_s, v_t, idx)
        return out_s, out_t

    @torch.no_grad()
    def update(self, v_s: torch.Tensor, v_t: torch.Tensor, idx: torch.Tensor) -> None:
        """m <- normalise(momentum * m + (1 - momentum) * v) on rows ``idx`` of both banks."""
        idx = concat_all_gather(idx)
        for bank, v in ((self.bank_s, v_s), (self.bank_t, v_t)):
            v = concat_all_gather(v.detach().to(bank.dtype))
            mixed = bank.index_select(0, idx) * self.momentum + v * (1.0 - self.momentum)
            bank.index_copy_(0, idx, nn.functional.normalize(mixed, dim=1))


class CRDLoss(ProjectionLoss):
    """``crd``: README weights CRD = (1, 0, 0.8), CRD+KD = (1, 1, 0.8). Needs ``idx``."""

    needs_index = True
    recipe = (1.0, 0.0, 0.8)
    recipe_kd = (1.0, 1.0, 0.8)

    def __init__(self, s_dim: int, t_dim: int, n_data: int | None = None, *,
                 feat_dim: int = 128, nce_k: int = 16384, temperature: float = 0.07,
                 momentum: float = 0.5) -> None:
        if n_data is None or int(n_data) < 2:
            raise CdirError("crd needs n_data, the training set size (its memory has a row per "
                            "sample)")
        check_positive("crd", feat_dim=feat_dim, nce_k=nce_k, temperature=temperature)
        if not 0.0 <= momentum < 1.0:
            raise CdirError(f"crd: momentum must be in [0, 1), got {momentum}")
        super().__init__(s_dim, t_dim, feat_dim)
        self.n_data = int(n_data)
        self.contrast = ContrastMemory(feat_dim, self.n_data, nce_k, temperature, momentum)

    def set_labels(self, labels: torch.Tensor | None) -> None:
        """Negatives from the other classes of ``labels`` (RepDistiller's rule); see the
        module docstring for what is drawn without them."""
        self.contrast.set_labels(labels)

    def embedding_loss(self, z_s: torch.Tensor, z_t: torch.Tensor, idx: torch.Tensor | None,
                       contrast_idx: torch.Tensor | None) -> torch.Tensor:
        if idx is None:
            raise CdirError("crd needs idx, the batch's dataset indices (use a data set that "
                            "returns them)")
        out_s, out_t = self.contrast(z_s, z_t, idx.long(), contrast_idx)
        return nce_loss(out_s, self.n_data) + nce_loss(out_t, self.n_data)


class CRDFifoLoss(QueueLoss):
    """``crd_fifo``: weights as CRD's. Both projections train (through the positive)."""

    recipe = (1.0, 0.0, 0.8)
    recipe_kd = (1.0, 1.0, 0.8)

    def __init__(self, s_dim: int, t_dim: int, n_data: int | None = None, *,
                 feat_dim: int = 128, queue_size: int = 16384, temperature: float = 0.07,
                 enqueue_before_loss: bool = False) -> None:
        check_positive("crd_fifo", feat_dim=feat_dim, queue_size=queue_size,
                       temperature=temperature)
        super().__init__(s_dim, t_dim, feat_dim, queue_size, enqueue_before_loss)
        self.temperature = float(temperature)

    def memory_loss(self, z_s: torch.Tensor, z_t: torch.Tensor,
                    memory: torch.Tensor) -> torch.Tensor:
        return infonce_loss(infonce_logits(z_s, z_t, memory), self.temperature)
