"""Training the top of a ResNet on cached feature maps of its frozen lower stages.

With ``freeze = "layer3"`` the stem and layers 1-3 keep the starting encoder's weights; their
outputs for ``views`` augmented views of every image (and for the eval view) are computed once
and kept in memory (float16), and training runs only layer 4 and the head. On CPUs this is an
order of magnitude faster per step than training the whole network (the lower stages hold most
of the compute and all of the augmentation cost), at the price of a fixed set of augmented views
per image. Memory: images x (views + 1) x the stage's map size x 2 bytes (for the 64 px emoji
encoder at layer 3: 3,825 x 9 x 128 x 8 x 8 x 2 B = 0.56 GB).

The views are drawn from a generator seeded by the run's seed, so a resumed run rebuilds the same
cache; under torchrun every rank builds the whole cache (each holds all of it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from cdir.core.errors import CdirError
from cdir.core.images import ImageList
from encoders.adapt.groups import Partners

STAGES = ("layer1", "layer2", "layer3")


def split_backbone(backbone: nn.Module, freeze: str) -> tuple[nn.Module, nn.Module]:
    """(frozen bottom, trainable top) of a ``ResNetTrunk``: the bottom runs the stem and the
    layers up to ``freeze``; the top the rest, the pooling and the flattening. Both share the
    backbone's modules (no copies)."""
    if freeze not in STAGES:
        raise CdirError(f"freeze must be one of {', '.join(STAGES)} (or none), not {freeze!r}")
    if not all(hasattr(backbone, n) for n in ("conv1", "layer4", "avgpool")):
        raise CdirError("freeze needs a ResNet backbone of this project")
    cut = STAGES.index(freeze) + 1
    layers = [getattr(backbone, f"layer{i}") for i in range(1, 5)]
    bottom = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool,
                           *layers[:cut])
    top = nn.Sequential(*layers[cut:], backbone.avgpool, nn.Flatten(1))
    return bottom, top


class _Views:
    """The views of one image, stacked (a class, not a closure: it pickles into loader
    workers)."""

    def __init__(self, transforms: list[Callable]) -> None:
        self.transforms = transforms

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.stack([t(img) for t in self.transforms])


def build_cache(bottom: nn.Module, paths: Sequence[str], view: Callable, clean: Callable,
                views: int, size: int, seed: int, workers: int, device: torch.device,
                batch_size: int = 64, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor,
                                                                       np.ndarray]:
    """Feature maps of the frozen ``bottom``: (maps of ``views`` augmented views (N, V, C, H, W),
    maps of the eval view (N, C, H, W), readable mask (N,)); float16 on the CPU."""
    data = ImageList(list(paths), _Views([clean] + [view] * views), (1 + views, 3, size, size))
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers,
                                         generator=gen, shuffle=False)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(data), unit="img", desc="caching feature maps", leave=False)
    was = bottom.training
    bottom.eval()
    aug_maps: torch.Tensor | None = None
    clean_maps: torch.Tensor | None = None
    ok_all = np.zeros(len(data), bool)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the augmentation draws when there are no workers
        for x, idx, ok in loader:
            b, v = x.shape[:2]
            z = bottom(x.flatten(0, 1).to(device)).to("cpu", torch.float16)
            z = z.view(b, v, *z.shape[1:])
            if aug_maps is None:
                aug_maps = torch.empty((len(data), views, *z.shape[2:]), dtype=torch.float16)
                clean_maps = torch.empty((len(data), *z.shape[2:]), dtype=torch.float16)
            clean_maps[idx] = z[:, 0]
            aug_maps[idx] = z[:, 1:]
            ok_all[idx.numpy()] = ok.numpy()
            if bar is not None:
                bar.update(b)
    bottom.train(was)
    if bar is not None:
        bar.close()
    assert aug_maps is not None and clean_maps is not None
    return aug_maps, clean_maps, ok_all


class CachedPairs(Dataset):
    """Like :class:`encoders.adapt.groups.PairedImages`, over cached maps: items
    ``([map of an anchor view, map of a positive view], tensor([anchor, positive]), ok)``."""

    def __init__(self, maps: torch.Tensor, ok: np.ndarray, domains: np.ndarray,
                 partner_p: float, focus: float = 0.0) -> None:
        self.maps, self.ok = maps, np.asarray(ok, bool)
        self.domains = np.asarray(domains, np.int64)
        self.partner_p, self.focus = float(partner_p), float(focus)
        self.readable = np.flatnonzero(self.ok)
        if not len(self.readable):
            raise CdirError("no readable image in the training set")
        self.set_groups(np.arange(len(self.ok)))

    def set_groups(self, groups: np.ndarray) -> None:
        self.partners = Partners(groups, self.domains)
        sizes = np.bincount(groups, minlength=len(groups))
        self.grouped = np.flatnonzero((sizes[groups] > 1) & self.ok)

    def __len__(self) -> int:
        return len(self.ok)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], torch.Tensor, bool]:
        r = torch.randint(1 << 30, (5,)).tolist()
        swap, coin = r[0] / (1 << 30), r[1] / (1 << 30)
        ok = bool(self.ok[index])
        i = index if ok else int(self.readable[r[2] % len(self.readable)])
        if len(self.grouped) and swap < self.focus:
            i = int(self.grouped[r[2] % len(self.grouped)])
        j = i
        members = self.partners.of(i)
        members = members[self.ok[members]]
        if len(members) and coin < self.partner_p:
            j = int(members[r[3] % len(members)])
        v = self.maps.shape[1]
        ka = r[4] % v
        # two different views of one image when the positive is the anchor itself
        kb = (ka + 1 + (r[4] // v) % max(v - 1, 1)) % v if i == j else (r[4] // v) % v
        return [self.maps[i, ka].float(), self.maps[j, kb].float()], torch.tensor([i, j]), ok
