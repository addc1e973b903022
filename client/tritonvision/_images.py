"""Turn what a user passes (bytes, paths, file objects) into the encoded bytes the ensemble takes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Union

import numpy as np

from .exceptions import InvalidImageError

ImageInput = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", IO[bytes]]


def encoded_bytes(image: ImageInput) -> bytes:
    """The encoded image file's bytes. Decoding happens on the server."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidImageError(f"cannot read image file {path}: {exc.strerror or exc}") from exc
    elif hasattr(image, "read"):
        data = image.read()
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidImageError("file objects must be opened in binary mode ('rb')")
        data = bytes(data)
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}: pass bytes, a path or a binary file object")
    return data


def as_tensor(data: bytes) -> np.ndarray:
    """``[1, n]`` UINT8: one batch item of encoded bytes."""
    return np.frombuffer(data, dtype=np.uint8)[None]


def describe(image: ImageInput) -> str:
    """A short name for an input, for error messages and CLI output."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    name = getattr(image, "name", None)
    if isinstance(name, str):
        return name
    return f"<{type(image).__name__}>"
