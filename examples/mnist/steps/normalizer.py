"""Normalize step: pixel values from 0..255 to floats in 0..1."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def normalize(raw: Path, normalized: Path, scale: float) -> None:
    """Scale the images of `raw` by 1/scale into `normalized` (labels unchanged)."""
    with np.load(raw) as data:
        arrays = {key: data[key] for key in data.files}
    for key in ("x_train", "x_test"):
        arrays[key] = (arrays[key].astype(np.float32) / scale).astype(np.float32)
    np.savez(normalized, **arrays)
    print(
        f"normalizer: scaled {len(arrays['x_train']) + len(arrays['x_test'])} images by 1/{scale}"
    )
