"""Small vector builders shared by the normalisation and mining tests."""

from __future__ import annotations

import numpy as np


def l2(z: np.ndarray) -> np.ndarray:
    """Rows (or one vector) scaled to unit length."""
    return z / np.linalg.norm(z, axis=-1, keepdims=True)
