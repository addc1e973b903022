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
    "VALIDATE",
    "PREPROCESS",
    "RESNET50",
    "IMAGE",
    "PIXEL_COUNT",
    "PIXELS",
    "SCORES",
    "NUM_CLASSES",
    "Tensor",
    "Preprocessing",
    "PREPROCESSING",
    "ImageLimits",
    "IMAGE_LIMITS",
    "image_suffixes",
    "REFUSAL_REASONS",
    "refusal_message",
    "refusal_reason",
    "BACKENDS",
    "Batching",
    "StepServing",
    "EngineBuild",
    "ENGINE_PRECISIONS",
    "ENGINE_ONNX",
    "Profile",
    "PROFILES",
    "CPU",
    "GPU",
    "GPU_TORCH",
    "TORCH_PRECISIONS",
]

# Model names in the repository. Clients only ever talk to the ensemble.
ENSEMBLE = "classifier"
# gpu profile only: a per-request header check ahead of DALI, which fails a whole batch on one bad image.
VALIDATE = "validate"
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
    # Pixels decoded together: preprocess splits a batch into decoder runs whose images add up to at most
    # this many (an image is never split; one over it runs alone). DALI sizes its buffers by the largest run
    # and never gives them back, so with limits per image only, one request of 16 images at the limit left
    # the step holding 6 GB. At max_pixels a run decodes no more than one largest image does, and 32 photos
    # of up to 3.75 MP still decode as one run.
    max_run_pixels: int = 120_000_000
    max_side: int = 16384
    max_bytes: int = 64 * 1024 * 1024
    # Long side over short side. The short side is resized to 256 pixels, so a 16384x1 PNG (133 bytes)
    # would become a 4-gigapixel image; at 32 the resized image is at most 8192x256 (6 MB), while
    # panoramas (up to ~12:1) still pass. It also bounds the minimum side: 512 pixels for the longest.
    max_aspect_ratio: float = 32.0


IMAGE_LIMITS = ImageLimits()

# File name suffixes of each format, for the tools that pick image files out of a folder.
_SUFFIXES = {"jpeg": (".jpg", ".jpeg", ".jpe"), "png": (".png",), "bmp": (".bmp",), "tiff": (".tif", ".tiff"),
             "webp": (".webp",)}


def image_suffixes(limits: ImageLimits = IMAGE_LIMITS) -> frozenset[str]:
    """Lower-case file suffixes of the formats ``limits`` accepts (``.jpg``, ``.png``, ...)."""
    return frozenset(s for fmt in limits.formats for s in _SUFFIXES.get(fmt, (f".{fmt}",)))

# Why a step refuses an image: its header (format, limits, truncation; checked per request before any
# decode), or decoding it failed. Exported as the label of tritonvision_refused_images_total{reason}.
REFUSAL_REASONS = ("header", "decode")
_REFUSED = "image refused"


def refusal_message(reason: str, detail: str) -> str:
    """The error message of a refused image: ``image refused (<reason>): <detail>``. The fixed start is
    the contract that tells a client's bad image from a server failure where no status code comes with
    the message (Triton's stream responses carry only the text)."""
    if reason not in REFUSAL_REASONS:
        raise ValueError(f"unknown refusal reason {reason!r}")
    return f"{_REFUSED} ({reason}): {detail}"


def refusal_reason(message: str) -> str | None:
    """The reason of a refused image's error message (also inside the ensemble's "in ensemble '...', "
    wrapping), else None."""
    at = message.find(_REFUSED + " (")
    if at < 0:
        return None
    reason = message[at + len(_REFUSED) + 2 :].split("): ", 1)[0]
    return reason if reason in REFUSAL_REASONS else None


# Ensemble interface, identical in both profiles.
IMAGE = Tensor("IMAGE", "UINT8", (-1,))
SCORES = Tensor("SCORES", "FP32", (NUM_CLASSES,))
# validate -> preprocess in the gpu profile: each image's decoded pixel count (width x height from its header,
# what the decoder will produce), sent only for an image the header check accepted (a refused one ends its
# request there). preprocess takes the image from the ensemble input and waits for this, so DALI never sees
# a refused upload and the image is not copied back out of validate: that copy halved validate's ceiling for
# 3 MB photos (benchmarks/validate_ceiling.py). Triton's batcher reads it too: the pixel budget of a DALI
# batch (Profile.max_batch_pixels) is the sum of this tensor over the batch's requests.
PIXEL_COUNT = Tensor("PIXEL_COUNT", "INT64", (1,))


def PIXELS(dtype: str) -> Tensor:  # noqa: N802 - reads as the tensor's name
    """The preprocess -> resnet50 tensor; its dtype is the engine input's (FP16 avoids a cast on the GPU)."""
    return Tensor("PIXELS", dtype, (3, PREPROCESSING.crop, PREPROCESSING.crop))


@dataclass(frozen=True)
class Batching:
    """Dynamic batching of one step model."""

    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int
    # Load shedding (Triton's default_queue_policy, REJECT): a request that finds max_queue_size requests
    # waiting is refused at once (UNAVAILABLE "Exceeds maximum queue size", the SDK's OverloadedError), and
    # one still waiting after queue_timeout_us is rejected; a request carrying a shorter timeout (the SDK
    # sends its remaining deadline) is rejected at that instead. 0 means unbounded / no timeout.
    max_queue_size: int = 0
    queue_timeout_us: int = 0

    @property
    def has_queue_policy(self) -> bool:
        """Whether Triton gets a queue policy. Triton's dynamic batcher cannot prefetch the next batch of a
        model with one (core r24.10 to main, ``PriorityQueue``): it waits for a free instance on a
        condition whose wake-up it can miss, and then sleeps its default 500 ms. With two or more instances
        the next completion wakes it; with one, nothing may (closed-loop clients wait for that very batch).
        benchmarks/queue_stall.py measures it."""
        return bool(self.max_queue_size or self.queue_timeout_us)

    def __post_init__(self) -> None:
        if any(b < 1 or b > self.max_batch_size for b in self.preferred_batch_sizes):
            raise ValueError(f"preferred batch sizes {self.preferred_batch_sizes} outside 1..{self.max_batch_size}")
        if self.max_queue_size < 0 or self.queue_timeout_us < 0:
            raise ValueError("max_queue_size and queue_timeout_us must be >= 0")


@dataclass(frozen=True)
class StepServing:
    """How one step model runs: instance count and kind, its batching, and the Triton backend that runs it."""

    instances: int
    kind: str  # "KIND_CPU" or "KIND_GPU"
    batching: Batching
    # "python" (this project's python-backend models), "dali" (the DALI backend running dali.py) or
    # "tensorrt_plan" (a TensorRT engine); the generated configs follow it.
    backend: str = "python"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")


BACKENDS = ("python", "dali", "tensorrt_plan")


# Engine precision -> dtype of the engine's input (and so of PIXELS). INT8 engines keep an FP16 input:
# the first convolution quantises it, and DALI writes FP16 as cheaply as FP32 with half the bytes.
ENGINE_PRECISIONS: dict[str, str] = {"fp16": "FP16", "int8": "FP16", "tf32": "FP32", "fp32": "FP32"}
# Engine precision -> the ONNX file it is built from. Engines are strongly typed (TensorRT 11 builds nothing
# else), so the types are the ONNX file's: FP16 weights for fp16, explicit Q/DQ for int8. TF32 is not a type
# but a math mode of FP32 convolutions, a builder setting on the FP32 file (off for fp32).
ENGINE_ONNX: dict[str, str] = {"fp16": "fp16", "int8": "int8", "tf32": "fp32", "fp32": "fp32"}


# Model-step precisions of gpu-torch: fp16 weights and activations, fp32 with TF32 convolutions, plain fp32.
TORCH_PRECISIONS = ("fp16", "tf32", "fp32")


@dataclass(frozen=True)
class EngineBuild:
    """How the TensorRT engine of the gpu profile is built (``build_engines.py engine``)."""

    precision: str = "fp16"  # one of ENGINE_PRECISIONS
    workspace_mib: int = 4096
    # INT8 quantisation of the ONNX file: images per calibration step and at most this many from the folder.
    calibration_batch_size: int = 32
    calibration_max_images: int = 1024

    def __post_init__(self) -> None:
        if self.precision not in ENGINE_PRECISIONS:
            raise ValueError(f"engine precision must be one of {sorted(ENGINE_PRECISIONS)}, got {self.precision!r}")

    @property
    def input_dtype(self) -> str:
        return ENGINE_PRECISIONS[self.precision]

    @property
    def onnx_precision(self) -> str:
        """Which ONNX file the engine is built from: ``fp32``, ``fp16`` or ``int8``."""
        return ENGINE_ONNX[self.precision]


@dataclass(frozen=True)
class Profile:
    """One deployment target. ``cpu`` runs everywhere (python backend); ``gpu`` is the NGC image (DALI + TensorRT);
    ``gpu-torch`` is the bundled server's python backend with PyTorch on any CUDA machine."""

    name: str
    pixels_dtype: str
    max_batch_size: int
    preprocess: StepServing
    resnet50: StepServing
    # Threads each CPU step may use (DALI worker threads, ONNX Runtime intra-op threads).
    cpu_threads: int = 2
    # cpu profile: batches up to this size run in an ONNX Runtime session whose threads spin between the
    # parallel sections of a run (a batch-1 ResNet-50 has ~70; a wake-up each cost 1.3 ms of 42 on 2 cores).
    # Larger batches, which come under load, run in one whose threads sleep: spinning there takes the
    # cores from the preprocess step decoding the next batch (saturation throughput fell ~10%).
    ort_spin_max_batch: int = 2
    # Batch sizes the TensorRT backend captures as CUDA graphs (gpu only).
    cuda_graph_batch_sizes: tuple[int, ...] = field(default=())
    # gpu only: the TensorRT engine build, the header-check step ahead of DALI, and the share of each batch
    # that DALI's mixed decoder sends to the hardware JPEG decoder (A100/H100/H200) rather than CUDA.
    engine: EngineBuild | None = None
    validate: StepServing | None = None
    hw_decoder_load: float = 0.65
    # gpu-torch only: the device the PyTorch steps run on ("cuda"; "cpu" is the override that runs the same
    # code on a machine without CUDA, for CI) and the precision of the model step (one of TORCH_PRECISIONS).
    torch_device: str | None = None
    torch_precision: str = "fp16"
    # Admission ahead of preprocessing (python-backend preprocess only): a batch is decoded only once resnet50
    # has room for it under this many pending images; until then requests wait, and the excess is refused,
    # at preprocess's queue, undecoded (tritonvision_server.admission). 0: off, and overload is refused at
    # resnet50's own queue after the preprocessing was spent.
    admission_pending: int = 0
    # gpu only: the most decoded pixels one DALI batch may hold (0: no budget). Triton's DALI backend decodes a
    # whole dynamic batch as one run, so the per-run budget of the python steps (ImageLimits.max_run_pixels)
    # cannot reach it; instead a custom batching strategy (server/tritonvision_server/batchstrategy/) makes the
    # batcher close a batch before a request that would take it past this sum of PIXEL_COUNT. A request over
    # it on its own still runs, alone; validate refuses a request whose images together exceed it.
    max_batch_pixels: int = 0
    # cpu only: each step runs one largest batch at load (Triton's model warm-up), so that what serving full
    # batches takes (ONNX Runtime's buffers, the pages of the python backend's regions that a full batch
    # touches, mapped in tritonserver too) is taken before the first request, not in the first burst: memory
    # is what it will be from the start, and the first full batch is no slower than the next.
    warmup_full_batch: bool = False

    @property
    def admission_limit(self) -> int:
        """The most images resnet50 may have pending once a preprocess batch joins them (0: no admission):
        ``admission_pending``, less a full batch from each other preprocess instance, which may pass the
        check at the same moment."""
        if not self.admission_pending or self.preprocess.backend != "python":
            return 0
        others = (self.preprocess.instances - 1) * self.preprocess.batching.max_batch_size
        return max(self.admission_pending - others, 1)

    def __post_init__(self) -> None:
        if self.engine is not None and self.engine.input_dtype != self.pixels_dtype:
            raise ValueError(
                f"a {self.engine.precision} engine takes {self.engine.input_dtype} input, "
                f"but the profile's PIXELS are {self.pixels_dtype}"
            )
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be within 0..1, got {self.hw_decoder_load}")
        if self.torch_device not in (None, "cuda", "cpu"):
            raise ValueError(f"torch_device must be 'cuda' or 'cpu', got {self.torch_device!r}")
        if self.torch_precision not in TORCH_PRECISIONS:
            raise ValueError(f"torch_precision must be one of {TORCH_PRECISIONS}, got {self.torch_precision!r}")
        if self.max_batch_pixels < 0:
            raise ValueError(f"max_batch_pixels must be >= 0, got {self.max_batch_pixels}")
        if self.max_batch_pixels:
            self._check_budget_batching()

    def _check_budget_batching(self) -> None:
        """A pixel budget holds only for batches the batcher forms in one pass. Triton's dynamic batcher
        (core r24.10 to r26.06) also (1) adds requests to a batch that still waits for a free instance, after
        re-initialising the strategy as for a new batch (``DynamicBatchScheduler::GetDynamicBatch`` resets it
        whenever the queue cursor was invalidated, which taking the previous batch out of the queue does),
        unless the batch was closed as saturated; and (2) merges batches waiting for the same instance when
        ``max_queue_delay_microseconds`` > 0 (``InstanceQueue::Dequeue``), without asking the strategy. With
        no queue delay and every batch size preferred, every batch is closed as saturated when it is formed,
        and no batches are merged."""
        b = self.preprocess.batching
        if b.max_queue_delay_us or set(b.preferred_batch_sizes) != set(range(1, b.max_batch_size + 1)):
            raise ValueError("a pixel budget (max_batch_pixels) needs preprocess batching with max_queue_delay_us 0 "
                             "and every batch size 1..max_batch_size preferred, or Triton grows and merges batches "
                             "past it")

    @property
    def pixels(self) -> Tensor:
        return PIXELS(self.pixels_dtype)

    def with_engine_precision(self, precision: str) -> "Profile":
        """This profile with another engine precision, and the PIXELS dtype that engine takes."""
        if self.engine is None:
            raise ValueError(f"the {self.name} profile has no TensorRT engine")
        from dataclasses import replace

        engine = replace(self.engine, precision=precision)
        return replace(self, engine=engine, pixels_dtype=engine.input_dtype)

    def on_cpu(self) -> "Profile":
        """A gpu-torch profile whose steps run the same PyTorch code on the CPU (one CPU instance each, no CUDA
        graphs): what CI serves on a machine without a GPU, where the cores, not the instances, are the limit."""
        if self.torch_device is None:
            raise ValueError(f"the {self.name} profile does not run PyTorch steps")
        from dataclasses import replace

        def cpu_step(step: StepServing, template: StepServing) -> StepServing:
            # ResNet-50 is ~100x slower on a CPU: the cpu profile's queue policies, one instance each, and
            # (for a lone resnet50 instance) admission as its queue bound, as in the cpu profile.
            batching = replace(step.batching, max_queue_size=template.batching.max_queue_size,
                               queue_timeout_us=template.batching.queue_timeout_us)
            return replace(step, kind="KIND_CPU", instances=1, batching=batching)

        return replace(self, torch_device="cpu", preprocess=cpu_step(self.preprocess, CPU.preprocess),
                       resnet50=cpu_step(self.resnet50, CPU.resnet50),
                       admission_pending=self.resnet50.batching.max_batch_size if self.admission_pending else 0)


CPU = Profile(
    name="cpu",
    pixels_dtype="FP32",
    max_batch_size=32,
    # Under load, requests queue while ResNet-50 runs (~40 ms per image on two cores) and leave together
    # as one batch without any delay; a delay would only cost a lone request latency.
    # Load shedding: the backlog builds in front of resnet50 (preprocess is ~10x faster), so preprocess admits
    # a batch only when resnet50 has room for it under 32 pending images (admission_pending: one largest
    # batch, 1.5-3 s of resnet50 work on two cores) and holds it until then; its own queue (32, 5 s) refuses
    # the excess at once, undecoded. With the SDK's default 64 requests in flight one client fills both
    # without a refusal. resnet50 has no queue policy of its own: admission bounds its queue, and with one
    # instance a policy would cost a 500 ms stall per batch there (Batching.has_queue_policy: nothing
    # enqueues while admission holds, and only an enqueue wakes the batcher reliably). One instance per step:
    # a second costs more on two cores (-7 to -25% img/s at 4 and 16 in flight) than preprocess's rare
    # stall does.
    preprocess=StepServing(1, "KIND_CPU", Batching(32, (8, 16), 0, max_queue_size=32, queue_timeout_us=5_000_000)),
    resnet50=StepServing(1, "KIND_CPU", Batching(32, (8, 16), 0)),
    admission_pending=32,
    warmup_full_batch=True,
)

GPU = Profile(
    name="gpu",
    pixels_dtype="FP16",
    max_batch_size=128,
    # Queues hold four full batches (~100 ms of work at ~5k img/s); requests beyond that are refused.
    # Two DALI instances: with a bounded queue, one instance can leave the batcher asleep for 500 ms after a
    # missed wake-up (Batching.has_queue_policy); the second keeps it awake and overlaps decodes.
    # preprocess prefers every batch size and has no queue delay: what the pixel budget needs to hold
    # (Profile._check_budget_batching). A batch is formed when an instance is free, of everything queued up to
    # 128 requests or the budget; under load requests queue while both instances are busy, so batches still fill.
    preprocess=StepServing(2, "KIND_GPU", Batching(128, tuple(range(1, 129)), 0, max_queue_size=512,
                                                   queue_timeout_us=1_000_000), backend="dali"),
    # Two engine instances overlap one batch's compute with the next one's copies.
    resnet50=StepServing(2, "KIND_GPU", Batching(128, (32, 64, 128), 100, max_queue_size=512, queue_timeout_us=1_000_000),
                         backend="tensorrt_plan"),
    cpu_threads=4,
    # Each graph also runs the batch sizes between the next smaller one and itself, padded (configs.graph_specs):
    # doubling sizes keep the padding under 2x where compute is cheapest.
    cuda_graph_batch_sizes=(1, 4, 8, 16, 32, 64, 128),
    engine=EngineBuild(precision="fp16"),
    # The header check costs ~6 us for a 68 KB JPEG (measured on 2 cores); the python-backend hop around it
    # is the real cost, so four CPU instances batch requests and keep it ahead of the GPU steps.
    validate=StepServing(4, "KIND_CPU", Batching(128, (), 0, max_queue_size=512, queue_timeout_us=1_000_000)),
    # 128 photos of up to 3.75 MP (the average the cpu profile's per-run budget allows: 32 in 120 MP) still
    # make one full batch; 4 images at max_pixels fill it. Decoded RGB of a batch: at most 1.44 GB per DALI
    # instance, against 46 GB for 128 images at max_pixels without it.
    max_batch_pixels=480_000_000,
)

GPU_TORCH = Profile(
    name="gpu-torch",
    pixels_dtype="FP16",
    max_batch_size=128,
    # Both steps are python-backend models with GPU instances. Two preprocess instances (stub processes)
    # overlap one batch's CPU work (per-request header checks, reading the requests) with the other's nvJPEG
    # decode; two model instances overlap one graph replay with the next batch's hand-over. Queues as in gpu.
    preprocess=StepServing(2, "KIND_GPU", Batching(128, (32, 64, 128), 500, max_queue_size=512, queue_timeout_us=1_000_000)),
    resnet50=StepServing(2, "KIND_GPU", Batching(128, (32, 64, 128), 100, max_queue_size=512, queue_timeout_us=1_000_000)),
    # Threads of the CPU fallback decoder (non-JPEG formats) in each preprocess instance.
    cpu_threads=4,
    # The model step captures one CUDA graph per size and pads a batch to the next one (torch_pipeline.GraphRunner).
    cuda_graph_batch_sizes=(1, 2, 4, 8, 16, 32, 64, 128),
    torch_device="cuda",
    torch_precision="fp16",
    # Admission as in cpu, at resnet50's queue bound, which stays as well: with two instances its policy
    # costs no stall.
    admission_pending=512,
)

PROFILES: dict[str, Profile] = {p.name: p for p in (CPU, GPU, GPU_TORCH)}
