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
#: libjpeg's largest width or height (JPEG_MAX_DIMENSION): Pillow fails a larger image only after the time
#: spent encoding it, so pixel inputs are refused by their size first.
JPEG_MAX_SIDE = 65500


def sample_images() -> list[Path]:
    """The sample photos shipped inside the package (JPEG), by name: for demos, benchmarks and load tests."""
    from importlib import resources

    folder = resources.files(__package__).joinpath("samples")
    return sorted((Path(str(p)) for p in folder.iterdir() if p.name.endswith(".jpg")), key=lambda p: p.name)


def image_files(source: str | os.PathLike) -> list[Path]:
    """A load test's images: the file itself, or a folder's image files (by suffix, not recursive, sorted);
    empty when the folder has none. The sweep hands perf_analyzer exactly what its Locust users send."""
    from .spec import image_suffixes

    path = Path(source)
    if not path.is_dir():
        return [path]
    suffixes = image_suffixes()
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def _is_pil(image: Any) -> bool:
    # Checked by duck type so that Pillow is imported only when a PIL image is actually passed.
    return type(image).__module__.startswith("PIL.") and hasattr(image, "save") and hasattr(image, "mode")


def _check_encodable(width: int, height: int, what: str) -> None:
    """Refuse pixels JPEG cannot hold by their size alone, before any time goes into encoding them."""
    if width == 0 or height == 0:
        raise InvalidImageError(f"{what} of {width}x{height} pixels is empty")
    if max(width, height) > JPEG_MAX_SIDE:
        raise InvalidImageError(
            f"{what} of {width}x{height} pixels is too large to encode as JPEG (at most {JPEG_MAX_SIDE} pixels a side)"
        )


def _encode_pil(image: "PILImage", what: str = "PIL image") -> bytes:
    _check_encodable(*image.size, what)
    try:
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    except (OSError, ValueError) as exc:
        raise InvalidImageError(f"cannot encode {what} ({image.mode}, {image.width}x{image.height}) as JPEG: {exc}") from exc
    return buf.getvalue()


def _encode_array(array: np.ndarray) -> bytes:
    Image = require("PIL.Image", extra="images", what="classifying numpy arrays (JPEG encoding)")
    if array.dtype != np.uint8:
        raise InvalidImageError(f"numpy images must be uint8 HxW or HxWx3, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or 0 in array.shape:
        raise InvalidImageError(f"numpy images must be uint8 HxW, HxWx3 or HxWx4, got shape {array.shape}")
    # Checked before the copy: a broadcast view of a few bytes can stand for gigabytes of pixels.
    _check_encodable(array.shape[1], array.shape[0], "numpy image")
    return _encode_pil(Image.fromarray(np.ascontiguousarray(array)), "numpy image")


def encoded_bytes(image: ImageInput) -> bytes:
    """The encoded image file's bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            return path.read_bytes()
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            why = (exc.strerror if isinstance(exc, OSError) else None) or exc
            raise InvalidImageError(f"cannot read image file {str(path)!r}: {why}") from exc
    if isinstance(image, np.ndarray):
        return _encode_array(image)
    if _is_pil(image):
        return _encode_pil(image)
    if hasattr(image, "read"):
        try:
            data = image.read()
        except (OSError, ValueError) as exc:  # closed, or not open for reading
            name = getattr(image, "name", type(image).__name__)
            raise InvalidImageError(f"cannot read image file object {name!r}: {exc}") from exc
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidImageError("file objects must be opened in binary mode ('rb')")
        return bytes(data)
    raise TypeError(
        f"unsupported image type {type(image).__name__}: pass bytes, a path, a binary file object, "
        "a PIL image or a uint8 numpy array"
    )



def stream_source(image: ImageInput) -> bytes | InvalidImageError:
    """What a stream sends for ``image``: its bytes, or the error that refuses it on the client (an
    unreadable file, pixels that cannot be encoded, no bytes), which the stream yields in its place."""
    try:
        data = encoded_bytes(image)
    except InvalidImageError as exc:
        return exc
    return data if data else InvalidImageError("empty image: 0 bytes")
