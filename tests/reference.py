"""The in-process reference: torchvision preprocessing + the same ONNX file in ONNX Runtime."""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np

from tritonvision.spec import PIXELS, PREPROCESSING


def torchvision_pixels(data: bytes) -> np.ndarray:
    """``Resize(256) + CenterCrop(224) + ToTensor + Normalize`` on the decoded (EXIF-oriented, RGB) image."""
    import torchvision.transforms as T
    from PIL import Image, ImageOps

    p = PREPROCESSING
    transform = T.Compose([T.Resize(p.resize_shorter), T.CenterCrop(p.crop), T.ToTensor(), T.Normalize(p.mean, p.std)])
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return transform(image).numpy()


@lru_cache(maxsize=2)
def _session(path: str):
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def reference_scores(onnx_path, data: bytes) -> np.ndarray:
    x = torchvision_pixels(data)[None]
    return _session(str(onnx_path)).run(None, {PIXELS("FP32").name: x})[0][0]


def top_k(scores: np.ndarray, k: int = 5) -> list[int]:
    return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]
