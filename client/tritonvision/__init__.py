"""tritonvision: classify images with a ResNet-50 ensemble on NVIDIA Triton Inference Server.

>>> from tritonvision import Classifier
>>> with Classifier("127.0.0.1:8001") as clf:
...     for p in clf.classify("cat.jpg", top_k=5):
...         print(f"{p.score:.3f} {p.label}")
"""

from ._async import AsyncClassifier
from ._client import Classifier, Measurement
from ._images import sample_images
from ._retry import RetryPolicy
from ._stats import Breakdown, StageStats, Statistics
from ._transport._channel import DEFAULT_URL
from ._types import Classification, Prediction
from .exceptions import (
    DeadlineExceededError,
    InternalServerError,
    InvalidImageError,
    MissingExtraError,
    ModelNotReadyError,
    OverloadedError,
    ServerError,
    ServerUnavailableError,
    SharedMemoryError,
    TritonVisionError,
)

__version__ = "0.1.0"

__all__ = [
    "Classifier",
    "AsyncClassifier",
    "DEFAULT_URL",
    "RetryPolicy",
    "Prediction",
    "Classification",
    "Statistics",
    "Breakdown",
    "StageStats",
    "Measurement",
    "TritonVisionError",
    "InvalidImageError",
    "ServerError",
    "ServerUnavailableError",
    "ModelNotReadyError",
    "OverloadedError",
    "InternalServerError",
    "DeadlineExceededError",
    "SharedMemoryError",
    "MissingExtraError",
    "sample_images",
    "__version__",
]
