"""The projection head every embedding loss shares (``ProjectionLoss``) and the FIFO-memory
protocol of the queue losses (``QueueLoss``): what the subclass's loss receives, where the
gradient goes, and when the queue changes."""

from __future__ import annotations

import pytest
import torch

from encoders.distill.losses import build_loss
from encoders.distill.losses.base import ProjectionLoss
from encoders.distill.losses.memory import QueueLoss


class _Seen(ProjectionLoss):
    """Returns a loss of the student embedding alone and keeps what it was given."""

    def embedding_loss(self, z_s: torch.Tensor, z_t: torch.Tensor, idx: torch.Tensor | None,
                       contrast_idx: torch.Tensor | None) -> torch.Tensor:
        self.seen = (z_s, z_t, idx, contrast_idx)
        return z_s.sum() + z_t.sum()


class _StudentVsMemory(QueueLoss):
    """A loss that reaches the teacher projection only through the memory rows."""

    def memory_loss(self, z_s: torch.Tensor, z_t: torch.Tensor,
                    memory: torch.Tensor) -> torch.Tensor:
        self.memory = memory
        return (z_s @ memory.t()).sum()


@pytest.mark.parametrize("name", ["crd", "crd_fifo", "dcd", "rrd"])
def test_the_embedding_losses_share_the_projection_head(name: str) -> None:
    loss = build_loss(name, 12, 10, 50, feat_dim=8)
    assert isinstance(loss, ProjectionLoss)
    assert loss.embed_s.weight.shape == (8, 12) and loss.embed_t.weight.shape == (8, 10)


def test_the_subclass_gets_unit_float32_embeddings_and_the_teacher_is_detached() -> None:
    torch.manual_seed(0)
    loss = _Seen(12, 10, 8)
    f_s = torch.randn(5, 12, requires_grad=True)
    f_t = torch.randn(5, 10, requires_grad=True)
    idx, cidx = torch.arange(5), torch.zeros(5, 3, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss(f_s.bfloat16(), f_t.bfloat16(), idx=idx, contrast_idx=cidx).backward()
    z_s, z_t, seen_idx, seen_cidx = loss.seen
    for z in (z_s, z_t):
        assert z.dtype == torch.float32 and z.shape == (5, 8)
        assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-5)
    assert seen_idx is idx and seen_cidx is cidx
    assert f_s.grad is not None and f_t.grad is None  # the teacher's features stay frozen
    assert loss.embed_t.weight.grad is not None  # its projection trains through z_t


@pytest.mark.parametrize("keep", [False, True])
def test_the_current_keys_pass_a_gradient_only_when_the_loss_says_so(keep: bool) -> None:
    torch.manual_seed(0)
    loss = _StudentVsMemory(12, 10, 8, queue_size=16, enqueue_before_loss=True)
    loss.keys_keep_gradient = keep
    f_s, f_t = torch.randn(4, 12), torch.randn(4, 10)
    loss(f_s, f_t).backward()
    assert (loss.embed_t.weight.grad is not None) == keep
    assert loss.embed_s.weight.grad is not None


@pytest.mark.parametrize("before", [False, True])
def test_the_keys_join_the_memory_before_or_after_the_loss(before: bool) -> None:
    torch.manual_seed(0)
    loss = _StudentVsMemory(12, 10, 8, queue_size=16, enqueue_before_loss=before)
    start = loss.queue.feats.clone()
    f_s, f_t = torch.randn(4, 12), torch.randn(4, 10)
    keys = torch.nn.functional.normalize(loss.embed_t(f_t), dim=1).detach()
    loss(f_s, f_t)
    # the memory the loss saw: the batch's keys in the first rows, or the queue as it was
    assert torch.allclose(loss.memory[:4], keys if before else start[:4], atol=1e-6)
    assert torch.equal(loss.memory[4:], start[4:])
    # training mode: the keys are in the queue afterwards, the pointer past them
    assert torch.allclose(loss.queue.feats[:4], keys, atol=1e-6)
    assert int(loss.queue.ptr) == 4


def test_eval_mode_leaves_the_queue_alone() -> None:
    torch.manual_seed(0)
    loss = _StudentVsMemory(12, 10, 8, queue_size=16, enqueue_before_loss=True).eval()
    start = loss.queue.feats.clone()
    loss(torch.randn(4, 12), torch.randn(4, 10))
    assert torch.equal(loss.queue.feats, start) and int(loss.queue.ptr) == 0


# --------------------------------------------------------------------------------------------
# the label-free teacher projection


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Each row's neighbours by cosine, nearest first (itself excluded)."""
    z = torch.nn.functional.normalize(x.double(), dim=1)
    sim = z @ z.t()
    sim.fill_diagonal_(-2.0)
    return sim.argsort(dim=1, descending=True)[:, :-1]


@pytest.mark.parametrize("name", ["dcd", "rrd", "crd_fifo"])
@pytest.mark.parametrize("feat_dim", [6, 9])
def test_label_free_teacher_projection_is_bias_free_and_keeps_the_neighbours(
        name: str, feat_dim: int) -> None:
    """Whitened-like unit teacher vectors: the projected targets rank every row's neighbours
    exactly as the teacher does (an orthogonal map when the student is at least as wide; the
    principal directions when the vectors span no more than its width), and no bias exists."""
    from encoders.distill.student import LabelFreeDistiller

    g = torch.Generator().manual_seed(0)
    # 30 unit vectors in 9 dims that span only 6 of them (so the 6-wide map is exact too)
    basis = torch.linalg.qr(torch.randn(9, 6, generator=g, dtype=torch.float64))[0]
    teacher = torch.nn.functional.normalize(torch.randn(30, 6, generator=g,
                                                        dtype=torch.float64) @ basis.t(), dim=1)
    loss = build_loss(name, feat_dim, 9, 30, feat_dim=feat_dim)
    assert loss.embed_t.bias is not None  # the labelled head has one ...
    LabelFreeDistiller(torch.nn.Linear(3, feat_dim), teacher.float(), loss)
    names = [n for n, _ in loss.named_parameters()] + [n for n, _ in loss.named_buffers()]
    assert not any(n.startswith("embed_t.") and n != "embed_t.weight" for n in names)
    assert not any(n.startswith("embed_t.") for n, _ in loss.named_parameters())  # frozen
    projected = loss.embed_t(teacher.float()).double()
    assert torch.equal(_ranks(projected), _ranks(teacher))
    if feat_dim >= 9:  # a rotation (with zero rows): every inner product kept
        torch.testing.assert_close(projected @ projected.t(), teacher @ teacher.t(),
                                   rtol=0, atol=1e-5)


def test_label_free_teacher_projection_is_the_identity_when_sizes_agree() -> None:
    from encoders.distill.student import LabelFreeDistiller

    teacher = torch.nn.functional.normalize(torch.randn(12, 8), dim=1)
    loss = build_loss("rrd", 8, 8, 12, feat_dim=8, queue_size=16)
    LabelFreeDistiller(torch.nn.Linear(3, 8), teacher, loss)
    assert isinstance(loss.embed_t, torch.nn.Identity)
    assert torch.equal(loss.embed_t(teacher), teacher)
