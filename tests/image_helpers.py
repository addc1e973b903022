"""Images the tests make (no files needed)."""

from __future__ import annotations

import io
import struct

import numpy as np


def encode(array: np.ndarray, fmt: str = "JPEG", **kwargs) -> bytes:
    """``array`` (uint8 HxW or HxWxC) encoded as ``fmt`` by Pillow."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def orientation_exif(orientation: int | None = None) -> bytes:
    """EXIF data, for Pillow's ``exif=``, whose orientation tag (0x0112) is ``orientation``; none when None."""
    from PIL import Image

    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    return exif.tobytes()


def jpeg(array: np.ndarray, mode: str | None = None, **kwargs) -> bytes:
    """``array`` as a quality-92 JPEG, converted to ``mode`` (``CMYK``, ``L``) first when given."""
    from PIL import Image

    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92, **kwargs)
    return buf.getvalue()


def undecodable_jpeg(jpeg: bytes) -> bytes:
    """``jpeg`` with its scan naming Huffman tables that do not exist: every header is intact, so the header
    check passes, and only decoding finds the damage."""
    i = 2
    while jpeg[i + 1] != 0xDA:
        i += 2 + struct.unpack(">H", jpeg[i + 2 : i + 4])[0]
    broken = bytearray(jpeg)
    broken[i + 6] = 0x77
    return bytes(broken)
