"""The student temperature of xdomain's soft targets, chosen without labels: the cross-entropy
between the targets (each image's ``--k`` nearest neighbours in every other domain under
per-domain whitening, softmax at ``--teacher-t``) and the softmax, per other domain, of the plain
cosines at each student temperature, on an encoder's stored features. The lowest is the
temperature at which the plain features already agree best with the targets.

    cdir embed -w runs/emoji --encoder SPEC
    python bench/soft_temperature.py -w runs/emoji --encoder SPEC [--k 10] [--teacher-t 0.05]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cdir.core.store import EmbeddingStore  # noqa: E402
from cdir.core.workspace import Workspace  # noqa: E402
from encoders.adapt.mining import soft_neighbours  # noqa: E402
from indexes.normalize import fit_normalizer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-w", "--workspace", default=str(ROOT / "runs" / "emoji"))
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--teacher-t", type=float, default=0.05)
    ap.add_argument("--student-t", type=float, nargs="+", default=[0.1, 0.05, 0.02, 0.01])
    ap.add_argument("--pca-dim", type=int, default=512, help="shared PCA before whitening")
    args = ap.parse_args()

    ws = Workspace(args.workspace).require()
    manifest = ws.manifest()
    x, valid = EmbeddingStore(ws.embeddings_dir(args.encoder)).load(manifest)
    x, dom = x[valid], manifest["domain"].to_numpy().astype(str)[valid]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    z = fit_normalizer(x, dom, "domain-whiten", pca_dim=args.pca_dim).transform(x, dom)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    idx, w = soft_neighbours(z, dom, args.k, args.teacher_t)
    names, codes = np.unique(dom, return_inverse=True)
    sims = x @ x.T
    for t in args.student_t:
        logits = sims / t
        lse = np.stack([np.logaddexp.reduce(logits[:, codes == d], axis=1)
                        for d in range(len(names))], 1)
        logp = np.take_along_axis(logits, idx, 1) - np.take_along_axis(lse, codes[idx], 1)
        print(f"student t {t}: cross-entropy to the targets {-(w * logp).sum(1).mean():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
