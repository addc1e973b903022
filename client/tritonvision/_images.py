"""Turn what a user passes into the encoded bytes the ensemble takes.

Encoded files (bytes, paths, binary file objects) travel as they are: decoding happens on the server.
Decoded pixels (PIL images, numpy arrays) are encoded to JPEG here first, which needs Pillow (the
``images`` extra); sending raw pixels would cost ~50x the bytes on the wire.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Union

import numpy as np

from .extras import require
from .exceptions import InvalidImageError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

ImageInput = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", IO[bytes], np.ndarray, "PILImage"]

#: Quality of the client-side JPEG encoding of pixel inputs: close to lossless for the classifier.
JPEG_QUALITY = 95


def sample_images() -> list[Path]:
    """The sample photos shipped inside the package (JPEG), by name: for demos, benchmarks and load tests."""
    from importlib import resources

    folder = resources.files(__package__).joinpath("samples")
    return sorted((Path(str(p)) for p in folder.iterdir() if p.name.endswith(".jpg")), key=lambda p: p.name)


def _is_pil(image: Any) -> bool:
    # Checked by duck type so that Pillow is imported only when a PIL image is actually passed.
    return type(image).__module__.startswith("PIL.") and hasattr(image, "save") and hasattr(image, "mode")


def _encode_pil(image: "PILImage") -> bytes:
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _encode_array(array: np.ndarray) -> bytes:
    Image = require("PIL.Image", extra="images", what="classifying numpy arrays (JPEG encoding)")
    if array.dtype != np.uint8:
        raise InvalidImageError(f"numpy images must be uint8 HxW or HxWx3, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or 0 in array.shape:
        raise InvalidImageError(f"numpy images must be uint8 HxW, HxWx3 or HxWx4, got shape {array.shape}")
    return _encode_pil(Image.fromarray(np.ascontiguousarray(array)))


def encoded_bytes(image: ImageInput) -> bytes:
    """The encoded image file's bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise InvalidImageError(f"cannot read image file {path}: {exc.strerror or exc}") from exc
    if isinstance(image, np.ndarray):
        return _encode_array(image)
    if _is_pil(image):
        return _encode_pil(image)
    if hasattr(image, "read"):
        data = image.read()
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidImageError("file objects must be opened in binary mode ('rb')")
        return bytes(data)
    raise TypeError(
        f"unsupported image type {type(image).__name__}: pass bytes, a path, a binary file object, "
        "a PIL image or a uint8 numpy array"
    )



def stream_source(image: ImageInput) -> bytes | InvalidImageError:
    """What a stream sends for ``image``: its bytes, or the error that refuses it on the client (an
    unreadable file, no bytes), which the stream yields in its place."""
    try:
        data = encoded_bytes(image)
    except InvalidImageError as exc:
        return exc
    return data if data else InvalidImageError("empty image: 0 bytes")
