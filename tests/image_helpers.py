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


def png_claiming(width: int, height: int, tag: int = 0) -> bytes:
    """A PNG of a few dozen bytes whose header claims ``width`` x ``height`` RGB pixels: every chunk is
    well formed, so the header check accepts it (a decoder would find its one IDAT far too short). ``tag``
    goes into a text chunk, to make files of the same size differ."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"tEXt", b"tag\x00%d" % tag)
            + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))
