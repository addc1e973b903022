"""The public surface: names in ``tritonvision.__all__``, the exception tree, optional extras."""

from __future__ import annotations

import inspect
import sys

import numpy as np
import pytest

import tritonvision
from tritonvision import exceptions


def test_all_lists_exactly_the_public_names():
    public = {n for n in dir(tritonvision) if not n.startswith("_")} - {"exceptions", "extras", "spec"}  # public modules
    assert set(tritonvision.__all__) - {"__version__"} == public
    for name in tritonvision.__all__:
        assert getattr(tritonvision, name) is not None


def test_every_sdk_error_derives_from_the_base_error():
    classes = [c for _, c in inspect.getmembers(exceptions, inspect.isclass) if issubclass(c, Exception)]
    assert set(exceptions.__all__) == {c.__name__ for c in classes}
    assert all(issubclass(c, tritonvision.TritonVisionError) for c in classes)
    assert issubclass(tritonvision.MissingExtraError, ImportError)


def test_clients_are_context_managers():
    assert hasattr(tritonvision.Classifier, "__enter__") and hasattr(tritonvision.Classifier, "__exit__")
    assert hasattr(tritonvision.AsyncClassifier, "__aenter__") and hasattr(tritonvision.AsyncClassifier, "__aexit__")


def test_numpy_input_without_pillow_names_the_images_extra(monkeypatch):
    from tritonvision._images import encoded_bytes

    monkeypatch.setitem(sys.modules, "PIL.Image", None)  # makes `import PIL.Image` fail as if not installed
    with pytest.raises(tritonvision.MissingExtraError, match=r"tritonvision\[images\]"):
        encoded_bytes(np.zeros((8, 8, 3), np.uint8))


def test_pixel_inputs_are_encoded_to_jpeg_and_bad_arrays_refused():
    from PIL import Image

    from tritonvision._images import encoded_bytes

    assert encoded_bytes(np.zeros((8, 8, 3), np.uint8))[:3] == b"\xff\xd8\xff"
    assert encoded_bytes(Image.new("RGBA", (4, 4)))[:3] == b"\xff\xd8\xff"
    with pytest.raises(tritonvision.InvalidImageError):
        encoded_bytes(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(TypeError):
        encoded_bytes(12345)
