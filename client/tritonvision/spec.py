"""The one source of truth for the classifier: tensor names, shapes, preprocessing and serving parameters.

Everything that must agree between the ONNX export, the DALI pipeline, the generated ``config.pbtxt``
files of both profiles and the client SDK is defined here once. Nothing in this module imports anything
beyond the standard library, so the SDK can use it without the server-side extras.

The request path::

    IMAGE (UINT8[-1], encoded bytes)                              ensemble "classifier"
      -> preprocess: decode, resize shorter side, centre crop, normalise, CHW  -> PIXELS
      -> resnet50:   ResNet-50 + softmax                                       -> SCORES (FP32[1000])
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "ENSEMBLE",
    "PREPROCESS",
    "RESNET50",
    "IMAGE",
    "PIXELS",
    "SCORES",
    "NUM_CLASSES",
    "Tensor",
    "Preprocessing",
    "PREPROCESSING",
    "ImageLimits",
    "IMAGE_LIMITS",
    "Batching",
    "StepServing",
    "Profile",
    "PROFILES",
    "CPU",
    "GPU",
]

# Model names in the repository. Clients only ever talk to the ensemble.
ENSEMBLE = "classifier"
PREPROCESS = "preprocess"
RESNET50 = "resnet50"

NUM_CLASSES = 1000


@dataclass(frozen=True)
class Tensor:
    """A tensor of one batch item: Triton dtype name (``UINT8``, ``FP16``, ``FP32``) and dims without the batch axis."""

    name: str
    dtype: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class Preprocessing:
    """torchvision's ``Resize(256) + CenterCrop(224) + ToTensor + Normalize`` in numbers."""

    resize_shorter: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def mean_255(self) -> tuple[float, ...]:
        return tuple(m * 255.0 for m in self.mean)

    @property
    def std_255(self) -> tuple[float, ...]:
        return tuple(s * 255.0 for s in self.std)


PREPROCESSING = Preprocessing()


@dataclass(frozen=True)
class ImageLimits:
    """What the service accepts; anything else is refused for its own request before decoding."""

    # Formats the DALI decoder handles on both profiles (the GPU decoder falls back to the CPU for non-JPEG).
    formats: tuple[str, ...] = ("jpeg", "png", "bmp", "tiff", "webp")
    # A 100-megapixel medium-format camera photo is ~11600x8700; refuse anything beyond that before it is
    # decoded, so one upload cannot take gigabytes of decode buffers.
    max_pixels: int = 120_000_000
    max_side: int = 16384
    max_bytes: int = 64 * 1024 * 1024


IMAGE_LIMITS = ImageLimits()

# Ensemble interface, identical in both profiles.
IMAGE = Tensor("IMAGE", "UINT8", (-1,))
SCORES = Tensor("SCORES", "FP32", (NUM_CLASSES,))


def PIXELS(dtype: str) -> Tensor:  # noqa: N802 - reads as the tensor's name
    """The preprocess -> resnet50 tensor; its dtype is the engine input's (FP16 avoids a cast on the GPU)."""
    return Tensor("PIXELS", dtype, (3, PREPROCESSING.crop, PREPROCESSING.crop))


@dataclass(frozen=True)
class Batching:
    """Dynamic batching of one step model."""

    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int

    def __post_init__(self) -> None:
        if any(b < 1 or b > self.max_batch_size for b in self.preferred_batch_sizes):
            raise ValueError(f"preferred batch sizes {self.preferred_batch_sizes} outside 1..{self.max_batch_size}")


@dataclass(frozen=True)
class StepServing:
    """How one step model runs: instance count and kind, and its batching."""

    instances: int
    kind: str  # "KIND_CPU" or "KIND_GPU"
    batching: Batching


@dataclass(frozen=True)
class Profile:
    """One deployment target. ``cpu`` runs everywhere (python backend); ``gpu`` is the NGC image (DALI + TensorRT)."""

    name: str
    pixels_dtype: str
    max_batch_size: int
    preprocess: StepServing
    resnet50: StepServing
    # Threads each CPU step may use (DALI worker threads, ONNX Runtime intra-op threads).
    cpu_threads: int = 2
    # Batch sizes the TensorRT backend captures as CUDA graphs (gpu only).
    cuda_graph_batch_sizes: tuple[int, ...] = field(default=())

    @property
    def pixels(self) -> Tensor:
        return PIXELS(self.pixels_dtype)


CPU = Profile(
    name="cpu",
    pixels_dtype="FP32",
    max_batch_size=32,
    # ResNet-50 costs ~40 ms per image on two cores: a few ms of queueing is free and lets requests
    # that arrive together share one ONNX Runtime call.
    preprocess=StepServing(1, "KIND_CPU", Batching(32, (8, 16), 2000)),
    resnet50=StepServing(1, "KIND_CPU", Batching(32, (8, 16), 5000)),
)

GPU = Profile(
    name="gpu",
    pixels_dtype="FP16",
    max_batch_size=128,
    preprocess=StepServing(1, "KIND_GPU", Batching(128, (32, 64, 128), 500)),
    # Two engine instances overlap one batch's compute with the next one's copies.
    resnet50=StepServing(2, "KIND_GPU", Batching(128, (32, 64, 128), 100)),
    cpu_threads=4,
    cuda_graph_batch_sizes=(1, 8, 32, 64, 128),
)

PROFILES: dict[str, Profile] = {p.name: p for p in (CPU, GPU)}
