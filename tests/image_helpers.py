"""Images the tests make (no files needed)."""

from __future__ import annotations

import io

import numpy as np


def encode(array: np.ndarray, fmt: str = "JPEG", **kwargs) -> bytes:
    """``array`` (uint8 HxW or HxWxC) encoded as ``fmt`` by Pillow."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()
