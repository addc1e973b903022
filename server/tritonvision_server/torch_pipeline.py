"""The gpu-torch profile's compute in plain PyTorch: decode, geometry, normalisation, and the ResNet-50 runner.

Device-agnostic: the same functions run on ``cuda`` (nvJPEG batch decode, CUDA graphs) and on ``cpu`` (the
libjpeg decoder, eager execution), so everything but the speed is tested on machines without a GPU.

Geometry is torchvision's ``Resize(256) + CenterCrop(224)`` to the pixel: the resized size truncates the long
side (``int(256 * long / short)``) and the crop offset rounds half-to-even, as in ``torchvision.transforms``
and in the DALI graph of the other profiles (:mod:`.dali_graph`). Resizing is bilinear with antialiasing in
float, rounded to whole grey levels as PIL does, then normalised with the spec's mean and std.

One difference stays on CUDA: torchvision creates its nvJPEG handle without
``NVJPEG_FLAGS_UPSAMPLING_WITH_INTERPOLATION`` (and has no option for it), so the chroma of a subsampled (4:2:0)
JPEG is replicated where libjpeg-turbo and DALI interpolate: a few grey levels at colour edges after resizing,
up to ~20 (measured on the CPU with libjpeg-turbo's replicating mode; tests/test_torch_pipeline.py).

Checked with torch 2.14.1 / torchvision 0.29.1 (CPU, here) and written for torch 2.11 / CUDA 13 (the GPU hosts).
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

from tritonvision.extras import require
from tritonvision.spec import IMAGE_LIMITS, NUM_CLASSES, PREPROCESSING

from .imagecheck import InvalidImage, exif_orientation, is_frame_header, jpeg_segments
from .pipeline import decoder_runs

log = logging.getLogger(__name__)

torch = require("torch", extra="gpu-torch", what="the gpu-torch profile")
# torchvision 0.29 deprecates its image decoders in favour of TorchCodec and warns on every call (the GPU
# hosts' torchvision for torch 2.11 does not); the decoders still work, and a warning per batch would flood
# the server log.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)
# PIL warns about what it reads in a damaged or large upload with the file's own numbers in the text (an image
# over its 89.5 MP DecompressionBombWarning limit, which the header check's own limit already bounds; a TIFF
# tag whose data runs past the file, ...). Python keeps every distinct text a module warned with, for the life
# of the process (~280 bytes each, plus a line in the server log), so uploads with ever-new numbers would grow
# the step's memory and the log without end. The decode's outcome is what counts: an image PIL cannot read
# fails as DecodeFailed. An "ignore" filter stores nothing (checked on CPython 3.11; tests/test_torch_pipeline.py).
warnings.filterwarnings("ignore", module=r"PIL\.")


# --- decoding -----------------------------------------------------------------------------------------------


# Frame types (SOF markers) that torchvision's GPU decoder takes: nvJPEG decodes baseline and progressive
# Huffman-coded JPEGs with 8-bit samples (SOF0; SOF1, extended sequential, the same with 16-bit quantisation
# tables or more Huffman tables; SOF2). It has no arithmetic decoding (SOF9-11), no lossless process in the
# backends torchvision uses (SOF3), no hierarchical mode (SOF5-7, SOF13-15) and no 12-bit samples.
NVJPEG_FRAMES = (0xC0, 0xC1, 0xC2)


@dataclass(frozen=True)
class JpegInfo:
    """What the decoder choice needs from a JPEG's header: colour components (1 grey, 3 YCbCr, 4 CMYK/YCCK),
    the EXIF orientation (1 = upright; 2..8 as in the EXIF standard), the frame type (its SOF marker, 0xC0
    baseline .. 0xCF) and the sample precision in bits."""

    components: int
    orientation: int = 1
    frame: int = 0xC0
    precision: int = 8

    @property
    def nvjpeg(self) -> bool:
        """Whether torchvision's ``decode_jpeg`` takes it on the GPU (nvJPEG); the others go to PIL."""
        return self.components in (1, 3) and self.frame in NVJPEG_FRAMES and self.precision == 8


def jpeg_info(data: bytes) -> JpegInfo | None:
    """The components, EXIF orientation, frame type and precision of a JPEG, or None for anything that is not
    a readable JPEG.

    nvJPEG (and torchvision's GPU path) ignores EXIF orientation, so it is read here and applied to the
    decoded tensor (:func:`orient`)."""
    if data[:2] != b"\xff\xd8":
        return None
    orientation = 1
    try:
        for marker, i, length in jpeg_segments(data):
            if marker in (0xD9, 0xDA):
                return None  # no frame header before the scan
            if marker == 0xE1 and orientation == 1:
                orientation = exif_orientation(data[i + 4 : i + 2 + length])
            if is_frame_header(marker):
                if i + 10 > len(data):
                    return None
                return JpegInfo(components=data[i + 9], orientation=orientation, frame=marker, precision=data[i + 4])
    except InvalidImage:
        return None
    return None


def orient(image, orientation: int):
    """``image`` ([C, H, W]) turned as a viewer shows it for EXIF ``orientation`` (PIL's ``exif_transpose``)."""
    h, w = -2, -1
    if orientation == 2:
        return image.flip(w)
    if orientation == 3:
        return image.flip(h, w)
    if orientation == 4:
        return image.flip(h)
    if orientation == 5:
        return image.transpose(h, w)
    if orientation == 6:
        return torch.rot90(image, -1, (h, w))
    if orientation == 7:
        return image.transpose(h, w).flip(h, w)
    if orientation == 8:
        return torch.rot90(image, 1, (h, w))
    return image


class DecodeFailed(ValueError):
    """An image that the decoder refused; the message says which format."""


def _as_tensor(row):
    import numpy as np

    row = np.ascontiguousarray(row, dtype=np.uint8)
    if not row.flags.writeable:  # torch.from_numpy warns on read-only arrays (the stub's input views)
        row = row.copy()
    return torch.from_numpy(row)


# PIL modes of 16-bit single-channel images (16-bit greyscale PNG and TIFF).
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _rgb_array(image):
    """An opened PIL image as ``[H, W, 3]`` uint8. 16-bit greyscale is scaled to 8 bits as DALI's decoders do
    (``round(v * 255 / 65535)``): PIL's ``convert("RGB")`` clips such values at 255 instead, which turns an
    ordinary 16-bit greyscale PNG almost entirely white, where the other profiles decode it as it is."""
    import numpy as np

    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image).astype(np.float32)
        grey = np.clip(np.rint(grey * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def _decode_other(data: bytes, device):
    """Images nvJPEG does not take (PNG, BMP, TIFF, WebP; CMYK, arithmetic-coded, lossless JPEG): PIL on the
    CPU, as the reference does, then moved to ``device``."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            array = _rgb_array(ImageOps.exif_transpose(image))
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data
        raise DecodeFailed(f"could not decode the image: {exc}") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(device, non_blocking=True)


def decode(rows, device) -> list:
    """Decode encoded images (1-D uint8 arrays) to ``[3, H, W]`` uint8 tensors on ``device``, upright.

    JPEGs that nvJPEG takes (:attr:`JpegInfo.nvjpeg`: baseline and progressive Huffman-coded, 8-bit, 1 or 3
    components) go through torchvision's ``decode_jpeg``: one batched nvJPEG call on CUDA, libjpeg on the CPU.
    When that call fails (it returns nothing then), each JPEG is decoded alone, and one that ``decode_jpeg``
    refuses is handed to PIL on the CPU before it is declared undecodable, so only images that no decoder
    takes fail. Everything else (other JPEG kinds, PNG, BMP, TIFF, WebP) is decoded by PIL, as the reference
    does. An image that cannot be decoded is returned as its :class:`DecodeFailed` in its slot."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    out: list = [None] * len(rows)
    jpegs, infos = [], []
    for i, row in enumerate(rows):
        data = memoryview(row).tobytes() if not isinstance(row, bytes) else row
        info = jpeg_info(data)
        if info is not None and info.nvjpeg:
            jpegs.append((i, _as_tensor(row)))
            infos.append(info)
        else:
            out[i] = _decode_or_failure(data, device)
    if not jpegs:
        return out
    tensors = [t for _, t in jpegs]
    try:
        if device.type == "cuda":
            images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        else:
            images = [decode_jpeg(t, mode=ImageReadMode.RGB) for t in tensors]
    except RuntimeError:
        images = None
    for k, ((i, t), info) in enumerate(zip(jpegs, infos)):
        try:
            image = images[k] if images is not None else decode_jpeg(t, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as exc:
            out[i] = _refused_by_decode_jpeg(t, device, exc)  # upright already, or its DecodeFailed
        else:
            out[i] = orient(image, info.orientation)
    return out


def _decode_or_failure(data: bytes, device):
    try:
        return _decode_other(data, device)
    except DecodeFailed as exc:
        # A new exception, without the raised one's traceback: its frames link to the caller's (f_back), whose
        # list this failure is returned into, and PIL's frames among them hold the partly decoded image. That
        # cycle is freed only by the garbage collector, which may not run for many batches: a 0.4 MB PNG
        # damaged near its end (120 MP) kept ~0.45 GiB per request until it did.
        return DecodeFailed(str(exc))


def _refused_by_decode_jpeg(encoded, device, exc: RuntimeError):
    """A JPEG that ``decode_jpeg`` refused on ``device``, decoded by PIL on the CPU, or its :class:`DecodeFailed`.

    nvJPEG refuses some JPEGs that libjpeg-turbo decodes and :func:`jpeg_info` does not single out (chroma
    sampling factors outside 4:4:4 .. 4:1:0, which torchvision's GPU path rejects as "Unknown chroma
    subsampling"); such an image is decoded the reference's way and a warning logged. A refusal that PIL
    confirms is a broken upload, the client's error and answered as such: logged at debug level only."""
    data = encoded.numpy().tobytes()
    try:
        image = _decode_other(data, device)
    except DecodeFailed as failed:
        log.debug("undecodable JPEG (%d bytes): decode_jpeg on %s: %s; PIL: %s", len(data), device, exc, failed)
        return DecodeFailed(f"could not decode the JPEG image: {exc}")
    log.warning("decode_jpeg on %s refused a JPEG (%d bytes) that PIL decoded on the CPU instead: %s",
                device, len(data), exc)
    return image


# --- geometry and normalisation -----------------------------------------------------------------------------


def resized_size(height: int, width: int, size: int = PREPROCESSING.resize_shorter) -> tuple[int, int]:
    """torchvision's ``Resize(size)`` output: the short side ``size``, the long side truncated."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def crop_offsets(height: int, width: int, crop: int = PREPROCESSING.crop) -> tuple[int, int]:
    """torchvision's ``CenterCrop`` top-left corner (Python's half-to-even ``round``)."""
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def resize_crop(images):
    """Upright ``[3, H, W]`` uint8 images -> ``[N, 3, crop, crop]`` float32 grey levels (0..255, whole numbers).

    Images of one size are resized together in one call (a batch of phone photos is mostly one or two sizes),
    so the number of kernel launches follows the number of distinct sizes, not of images."""
    crop = PREPROCESSING.crop
    if not images:
        raise ValueError("no images")
    out = torch.empty(len(images), 3, crop, crop, device=images[0].device)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(i)
    for (h, w), members in groups.items():
        new_h, new_w = resized_size(h, w)
        top, left = crop_offsets(new_h, new_w)
        x = torch.stack([images[i] for i in members]) if len(members) > 1 else images[members[0]][None]
        x = torch.nn.functional.interpolate(x.float(), size=(new_h, new_w), mode="bilinear", align_corners=False,
                                            antialias=True)
        # PIL resizes in uint8 and rounds; doing the same halves the difference to the reference.
        x = x[:, :, top : top + crop, left : left + crop].round_().clamp_(0, 255)
        if len(members) == len(images):
            return x
        out[torch.tensor(members, device=out.device)] = x
    return out


class Normaliser:
    """``(x / 255 - mean) / std`` of a ``[N, 3, crop, crop]`` batch of grey levels, as one fused op per batch."""

    def __init__(self, device, dtype):
        p = PREPROCESSING
        self.mean = torch.tensor(p.mean_255, device=device).view(1, 3, 1, 1)
        self.inv_std = (1.0 / torch.tensor(p.std_255, device=device)).view(1, 3, 1, 1)
        self.dtype = dtype

    def __call__(self, batch):
        return ((batch - self.mean) * self.inv_std).to(self.dtype)


def preprocess(images: list, device, dtype=None):
    """Decoded images (each ``[3, H, W]`` uint8 on ``device``) -> ``[N, 3, crop, crop]`` pixels of ``dtype``."""
    return Normaliser(images[0].device, dtype or torch.float32)(resize_crop(images))


def preprocess_runs(rows, pixels, device, normalise, *, budget: int = IMAGE_LIMITS.max_run_pixels):
    """Decode, resize, crop and normalise encoded images (1-D uint8 arrays) in runs of at most ``budget``
    pixels (``pixels``: each image's width x height from its header; :func:`.pipeline.decoder_runs`).

    Returns ``(pixels, where)``: ``[n, 3, crop, crop]`` pixels of the images that decoded, in order (None if
    none did), and for each row its index in them or its :class:`DecodeFailed`. A run's decoded images (and
    their float copies in :func:`resize_crop`, 4 bytes a channel) are released before the next run is
    decoded, so the memory a batch takes, and on CUDA what the caching allocator keeps of it afterwards, is
    that of one run, however many large images the batch carries. The spec's budget keeps a batch of
    ordinary photos one nvJPEG call."""
    where: list = [None] * len(rows)
    parts, done = [], 0
    for run in decoder_runs(pixels, budget=budget, max_images=max(len(rows), 1)):
        images = decode([rows[k] for k in run], device)
        good = []
        for k, image in zip(run, images):
            if isinstance(image, DecodeFailed):
                where[k] = image
            else:
                where[k] = done + len(good)
                good.append(image)
        if good:
            parts.append(normalise(resize_crop(good)))
            done += len(good)
        del images, good  # before the next run is decoded, or two runs' images would be held at once
    if not parts:
        return None, where
    return (parts[0] if len(parts) == 1 else torch.cat(parts)), where


# --- the model ----------------------------------------------------------------------------------------------


def load_resnet50(weights_path, device, precision: str = "fp16"):
    """torchvision ResNet-50 with the state dict at ``weights_path`` (written by :func:`.onnx_export.export_state_dict`,
    from the same weights as the ONNX file), followed by a softmax in FP32 like the exported graph.

    On CUDA: channels-last, FP16 weights for ``fp16``, TF32 convolutions for ``tf32``. On the CPU the model
    runs in FP32 whatever ``precision`` says (CPU FP16 convolutions are slow and not what is being tested)."""
    require("torchvision", extra="gpu-torch", what="the gpu-torch profile")
    from torchvision.models import resnet50

    device = torch.device(device)
    model = resnet50()
    model.load_state_dict(torch.load(str(weights_path), map_location="cpu", weights_only=True))
    model.eval().to(device)
    dtype = torch.float32
    if device.type == "cuda":
        set_tf32(precision == "tf32")
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
        if precision == "fp16":
            model = model.half()
            dtype = torch.float16
    return Classifier(model, dtype), dtype


def set_tf32(enabled: bool) -> None:
    """TF32 for FP32 convolutions and matmuls (process-wide in PyTorch)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


class Classifier(torch.nn.Module):
    """ResNet-50 on pixels of any float dtype -> FP32 softmax scores."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.channels_last = next(model.parameters()).is_cuda

    def forward(self, pixels):
        x = pixels.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float().softmax(dim=1)


def graph_batch_size(n: int, sizes) -> int:
    """The smallest captured batch size that holds ``n`` images (the largest one when none does: the batch
    is then run in chunks of it)."""
    sizes = sorted(sizes)
    return next((s for s in sizes if s >= n), sizes[-1])


class GraphRunner:
    """Runs ``fn`` (pixels -> scores) over batches of any size; with ``batch_sizes`` it pads each batch to the
    next of those sizes, and on CUDA with ``capture`` it replays a CUDA graph captured for each size.

    A graph replays one fixed sequence of kernels on fixed buffers: the batch is copied into that size's
    static input, the graph replayed, and the first ``n`` rows of its static output copied out. Without
    ``batch_sizes`` (the CPU) a batch runs eagerly as it is, unpadded."""

    def __init__(self, fn, batch_sizes=(), *, device="cpu", input_dtype=None, capture: bool = True,
                 warmup: int = 3):
        self.fn = fn
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.device = torch.device(device)
        self.input_dtype = input_dtype or torch.float32
        self.graphs: dict[int, tuple] = {}
        self.padded_images = 0  # images of padding run so far (a measure of the waste)
        if capture and self.batch_sizes and self.device.type == "cuda":
            self._capture(warmup)

    def _capture(self, warmup: int) -> None:
        crop = PREPROCESSING.crop
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        with torch.inference_mode():
            # Largest first: the smaller graphs reuse its memory from the shared pool.
            for size in reversed(self.batch_sizes):
                static_in = torch.zeros(size, 3, crop, crop, device=self.device, dtype=self.input_dtype)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for _ in range(warmup):  # cuDNN picks its algorithms before capture
                        self.fn(static_in)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    static_out = self.fn(static_in)
                self.graphs[size] = (graph, static_in, static_out)
        torch.cuda.synchronize(self.device)
        log.info("captured CUDA graphs for batch sizes %s", list(self.batch_sizes))

    def _run(self, chunk):
        n = chunk.shape[0]
        if not self.batch_sizes:
            return self.fn(chunk)
        size = graph_batch_size(n, self.batch_sizes)
        self.padded_images += size - n
        if size in self.graphs:
            graph, static_in, static_out = self.graphs[size]
            static_in[:n].copy_(chunk)
            if n < size:
                static_in[n:].zero_()  # padding rows of a previous, larger batch would be harmless, but zeros are cheap
            graph.replay()
            return static_out[:n].clone()
        if n < size:
            chunk = torch.cat([chunk, chunk.new_zeros((size - n, *chunk.shape[1:]))])
        return self.fn(chunk)[:n]

    def __call__(self, pixels):
        """Scores ``[N, 1000]`` (FP32, on the runner's device) for pixels ``[N, 3, crop, crop]``."""
        with torch.inference_mode():
            if pixels.shape[0] == 0:
                return torch.empty(0, NUM_CLASSES, device=self.device)
            limit = self.batch_sizes[-1] if self.batch_sizes else pixels.shape[0]
            parts = [self._run(pixels[i : i + limit]) for i in range(0, pixels.shape[0], limit)]
            return parts[0] if len(parts) == 1 else torch.cat(parts)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device_for(requested: str, device_id: int | str | None = None):
    """The torch device a step runs on: ``cuda:<id>`` (the instance's GPU) or ``cpu``; a clear error when
    CUDA is asked for and this PyTorch sees no GPU."""
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "the gpu-torch profile needs a CUDA GPU visible to PyTorch (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, CUDA build {torch.version.cuda}); run it on a GPU host, or run the same "
            "models on the CPU (slow; for tests): `tritonvision serve --profile gpu-torch --torch-device cpu` "
            "(or TRITONVISION_TORCH_DEVICE=cpu)"
        )
    return torch.device(f"cuda:{int(device_id or 0)}")
