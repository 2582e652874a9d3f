"""Captioning throughput: batched versus one image at a time, same model, same run.

    python bench/bench_caption.py [--n 32] [--batch-size 16] [--tokens 20] [--device cuda]

The model is the full-size BLIP-base architecture (BlipConfig defaults: ViT-B/16 at 384 px and a
BERT-base text decoder, about 247M parameters) with random weights: the real compute cost without
a download. It runs through the project's Captioner (processor, generate, decode), so the numbers
include preprocessing and decoding. min_new_tokens = max_new_tokens, so every caption is exactly
--tokens tokens long in both modes and the two timings do the same work. On CUDA the weights are
bf16 (fp16 where bf16 is missing), on CPU fp32 — the product's defaults.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere


def blip_base_random(device: str | None, dtype: str | None):
    """A Captioner over a randomly initialised BLIP-base with a working processor."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    from cdir.core.device import resolve_device, resolve_dtype
    from encoders.captioners import Captioner

    config = BlipConfig()  # the defaults are BLIP-base's sizes
    tc = config.text_config
    # a WordPiece vocabulary of the real size with the real special-token positions
    vocab = {f"w{i}": i for i in range(tc.vocab_size)}
    for tok, i in (("[PAD]", tc.pad_token_id), ("[UNK]", 100), ("[CLS]", 101),
                   ("[SEP]", tc.sep_token_id), ("[MASK]", 103), ("[DEC]", tc.bos_token_id)):
        vocab.pop(next(k for k, v in vocab.items() if v == i))
        vocab[tok] = i
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    processor = BlipProcessor(BlipImageProcessor(), tokenizer)
    dev = resolve_device(device)
    dt = resolve_dtype(dev, dtype)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).to(dev, dt).eval()
    n_params = sum(p.numel() for p in model.parameters())
    return Captioner(model, processor, "blip", "hf:bench/blip-base-random",
                     {"prompt": None, "max_new_tokens": 0, "min_new_tokens": 0, "num_beams": 1},
                     device=dev, dtype=dt), n_params


def images(n: int, seed: int = 0) -> list:
    """Photo-sized random images of varied shapes (the processor resizes them to 384 px)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(300, 640)), int(rng.integers(300, 640))
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return out


def timed(fn, sync) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="images per mode (default 32)")
    ap.add_argument("--batch-size", type=int, default=16, help="batched mode (default 16)")
    ap.add_argument("--tokens", type=int, default=20, help="tokens per caption (default 20)")
    ap.add_argument("--beams", type=int, default=1, help="beam width (default 1)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    ap.add_argument("--dtype", default=None, help="fp32, fp16, bf16 (default: bf16 on GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cap, n_params = blip_base_random(args.device, args.dtype)
    cap.params.update(max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                      num_beams=args.beams)
    sync = torch.cuda.synchronize if cap.device.type == "cuda" else (lambda: None)
    imgs = images(args.n)
    name = torch.cuda.get_device_name(cap.device) if cap.device.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"BLIP-base architecture, random weights ({n_params / 1e6:.0f}M params), "
          f"{str(cap.dtype).replace('torch.', '')} on {name}; {args.n} images, "
          f"{args.tokens} tokens per caption, beams {args.beams}")

    # warm-up: kernels, allocator and the first-call overheads of both shapes
    cap.caption(imgs[:1])
    cap.caption(imgs[: min(2, args.n)])

    out_b: list[str] = []
    out_s: list[str] = []
    bs = args.batch_size
    t_batched = timed(lambda: [out_b.extend(cap.caption(imgs[i: i + bs]))
                               for i in range(0, len(imgs), bs)], sync)
    t_single = timed(lambda: [out_s.extend(cap.caption([im])) for im in imgs], sync)
    assert len(out_b) == len(out_s) == args.n

    rate_b, rate_s = args.n / t_batched, args.n / t_single
    print(f"{'mode':<22}{'seconds':>10}{'images/s':>11}")
    print(f"{'batched (batch ' + str(bs) + ')':<22}{t_batched:>10.2f}{rate_b:>11.2f}")
    print(f"{'one image at a time':<22}{t_single:>10.2f}{rate_s:>11.2f}")
    print(f"batched / one-at-a-time throughput: x{rate_b / rate_s:.2f}")
    if cap.device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(cap.device) / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
