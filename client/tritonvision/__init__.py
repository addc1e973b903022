"""tritonvision: classify images with a ResNet-50 ensemble on NVIDIA Triton Inference Server.

>>> from tritonvision import Classifier
>>> with Classifier("127.0.0.1:8001") as clf:
...     for p in clf.classify("cat.jpg", top_k=5):
...         print(f"{p.score:.3f} {p.label}")
"""

from ._client import DEFAULT_URL, Classifier
from ._types import Prediction
from .exceptions import (
    DeadlineExceededError,
    InternalServerError,
    InvalidImageError,
    ModelNotReadyError,
    OverloadedError,
    ServerError,
    ServerUnavailableError,
    TritonVisionError,
)

__version__ = "0.1.0"

__all__ = [
    "Classifier",
    "DEFAULT_URL",
    "Prediction",
    "TritonVisionError",
    "InvalidImageError",
    "ServerError",
    "ServerUnavailableError",
    "ModelNotReadyError",
    "OverloadedError",
    "InternalServerError",
    "DeadlineExceededError",
    "__version__",
]
