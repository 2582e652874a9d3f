"""User-facing errors: the CLI prints these as one line and exits non-zero."""

from __future__ import annotations

import os
import re


class CdirError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ModelUnavailable(CdirError):
    """A model that is neither cached locally nor reachable."""


def first_line(e: BaseException, width: int = 200) -> str:
    """An exception as one short line, for messages that name a cause without its traceback."""
    text = str(e).strip().splitlines()
    return text[0][:width] if text else e.__class__.__name__


def unreadable(path: str | os.PathLike, error: BaseException, what: str = "checkpoint"
               ) -> CdirError:
    """The one line for a file ``torch.load(weights_only=True)`` refused with ``error``: a class
    the file holds that weights-only loading does not allow is named; anything else (random
    bytes, a text file, a truncated or damaged file) is not a checkpoint. Never torch's advice
    to load with ``weights_only=False``, which would run whatever the file holds."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if found:
        return CdirError(f"cannot read {what} {path}: it holds {found.group(1)}, which "
                         "weights-only loading refuses (not a file cdir reads)")
    return CdirError(f"{path} is not a {what} (not a file written by torch.save, or a damaged "
                     "one)")
