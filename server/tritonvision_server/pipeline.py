"""The DALI preprocessing pipeline, shared by both profiles.

The graph itself is :func:`.dali_graph.preprocess_graph`. The cpu profile runs it here, inside a
python-backend model, with the CPU decoder; the gpu profile ships the same function, with the GPU decoder
(``device="mixed"``), as ``preprocess/1/dali.py``, which the Triton DALI backend autoserialises with the
server image's own DALI (:func:`dali_model_source`).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources

from tritonvision.spec import IMAGE, IMAGE_LIMITS, PIXEL_COUNT, PREPROCESSING

from tritonvision.extras import require

DECODER_DEVICES = ("cpu", "mixed")


def _dali():
    require("nvidia.dali", extra="server", what="the DALI preprocessing pipeline")
    from nvidia import dali

    return dali


def _graph_args(decoder_device: str, pixels_dtype: str, hw_decoder_load: float, pixel_count: str | None = None) -> tuple:
    """The arguments of :func:`.dali_graph.preprocess_graph`, in order, from the spec."""
    p = PREPROCESSING
    return (IMAGE.name, pixel_count, decoder_device, pixels_dtype, hw_decoder_load, p.resize_shorter, p.crop, p.mean_255,
            p.std_255)


def _pipeline_fn():
    dali = _dali()
    from .dali_graph import preprocess_graph

    # A pipeline_def function cannot take **kwargs, so every knob is a named argument.
    @dali.pipeline_def
    def preprocess_pipeline(decoder_device="cpu", pixels_dtype="FP32", hw_decoder_load=0.65):
        return preprocess_graph(*_graph_args(decoder_device, pixels_dtype, hw_decoder_load))

    return preprocess_pipeline


def build_pipeline(
    *,
    batch_size: int,
    num_threads: int,
    decoder_device: str = "cpu",
    pixels_dtype: str = "FP32",
    device_id: int | None = None,
    hw_decoder_load: float = 0.65,
):
    """Build (not yet start) the preprocessing pipeline.

    ``device_id=None`` builds a CPU-only pipeline; that also serialises a ``mixed`` pipeline on a machine
    without a GPU, since the DALI backend supplies the device, batch size and threads when it loads it.
    """
    if decoder_device not in DECODER_DEVICES:
        raise ValueError(f"decoder_device must be one of {DECODER_DEVICES}, got {decoder_device!r}")
    if pixels_dtype not in ("FP32", "FP16"):
        raise ValueError(f"pixels_dtype must be FP32 or FP16, got {pixels_dtype!r}")
    return _pipeline_fn()(
        decoder_device=decoder_device,
        pixels_dtype=pixels_dtype,
        hw_decoder_load=hw_decoder_load,
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        # feed_input-driven pipelines must not prefetch: run() consumes exactly what was fed.
        prefetch_queue_depth=1,
        exec_async=False,
        exec_pipelined=False,
    )


def decoder_runs(pixels: Sequence[int], *, budget: int = IMAGE_LIMITS.max_run_pixels, max_images: int) -> list[range]:
    """Split a batch of images (their pixel counts, in order) into consecutive runs of the decoder: at most
    ``max_images`` images a run, whose pixels add up to at most ``budget``; an image over it runs alone.

    Measured with DALI 2.4 on the CPU: the decoder's buffers grow with the decoded pixels of a run (in steps
    of up to 2x) and stay with the process for good, even across a rebuilt pipeline; after mixed batches up
    to ~4x one run's decoded bytes stayed. Bounding the run rather than the batch bounds that memory whatever
    a batch carries; the spec's budget (one largest image) leaves every batch of ordinary photos one run.
    """
    runs: list[range] = []
    start, total = 0, 0
    for i, p in enumerate(pixels):
        if i > start and (total + p > budget or i - start == max_images):
            runs.append(range(start, i))
            start, total = i, 0
        total += p
    if len(pixels) > start:
        runs.append(range(start, len(pixels)))
    return runs


def _header_pixels(image) -> int:
    """Width x height from the image's header; an image whose header is refused counts as over any budget
    (it runs alone, and fails alone)."""
    from .imagecheck import InvalidImage, inspect

    try:
        info = inspect(image if isinstance(image, bytes) else memoryview(image).tobytes())
    except InvalidImage:
        return IMAGE_LIMITS.max_pixels + 1
    return info.width * info.height


class DecodeError(RuntimeError):
    """A pipeline run failed; ``sample`` is the index (in the images of the call, or of the request in
    :meth:`CpuPreprocessor.run_requests`) of the image DALI names as the one it could not decode, or None."""

    def __init__(self, message: str, sample: int | None):
        super().__init__(message)
        self.sample = sample


def _failed_sample(error: BaseException) -> int | None:
    """The sample index in DALI's decoder error ("Failed to decode sample #2"), checked with DALI 2.4.
    DALI raises a plain RuntimeError and gives the index nowhere else; None when the text changes."""
    import re

    match = re.search(r"decode sample #(\d+)", str(error))
    return int(match.group(1)) if match else None


class CpuPreprocessor:
    """Runs the pipeline on the CPU over lists of encoded images, returning ``[n, 3, crop, crop]`` arrays.

    A list is decoded in runs of :func:`decoder_runs` (``max_batch_size`` images and ``run_pixels`` pixels at
    most), so its decode memory is that of one run whatever it carries. Callers that know the images' sizes
    (the header check read them) pass ``pixels``; otherwise they are read from the headers here."""

    def __init__(self, *, max_batch_size: int, num_threads: int, pixels_dtype: str = "FP32",
                 run_pixels: int = IMAGE_LIMITS.max_run_pixels):
        self._args = dict(batch_size=max_batch_size, num_threads=num_threads, pixels_dtype=pixels_dtype)
        self.max_batch_size = max_batch_size
        self.run_pixels = run_pixels
        self.runs = 0  # DALI runs started, failed ones included
        self.rebuilds = 0
        self._pipe = self._start()

    def _start(self):
        pipe = build_pipeline(**self._args)
        pipe.build()
        return pipe

    def _runs(self, images: list, pixels: Sequence[int] | None) -> list[range]:
        if pixels is None:
            pixels = [_header_pixels(image) for image in images]
        elif len(pixels) != len(images):
            raise ValueError(f"{len(pixels)} pixel counts for {len(images)} images")
        return decoder_runs(pixels, budget=self.run_pixels, max_images=self.max_batch_size)

    def _decode(self, images: list):
        """One DALI run over ``images`` (at most a batch); :class:`DecodeError` naming the index in ``images``."""
        self.runs += 1
        self._pipe.feed_input(IMAGE.name, images)
        try:
            (pixels,) = self._pipe.run()
        except Exception as exc:
            # After a failed run DALI (2.4) declares the pipeline object invalid ("no longer valid"):
            # it cannot skip one bad sample or go on, so a failure costs a rebuild (~8-30 ms).
            self._pipe = self._start()
            self.rebuilds += 1
            raise DecodeError(str(exc), _failed_sample(exc)) from exc
        return pixels.as_array()

    def __call__(self, encoded: list, pixels: Sequence[int] | None = None):
        """Pixels of every image; :class:`DecodeError` if one fails (naming it when DALI does)."""
        import numpy as np

        if not encoded:
            raise ValueError("no images")
        out = []
        for run in self._runs(encoded, pixels):
            try:
                out.append(self._decode([encoded[k] for k in run]))
            except DecodeError as exc:
                raise DecodeError(str(exc), None if exc.sample is None else run.start + exc.sample) from exc.__cause__
        return np.concatenate(out) if len(out) > 1 else out[0]

    def run_requests(self, requests: list[list], pixels: list[Sequence[int]] | None = None) -> list:
        """Pixels per request (a list of encoded images each), or the :class:`DecodeError` of a request
        whose image failed (``sample``: its index in the request); the others are unaffected.

        The images of all requests are decoded in runs (a request's images may span runs). When DALI names
        the image it could not decode, that request is set aside and the rest of the run runs again, so a
        bad image costs a rebuild and one rerun of its run. Only when DALI names none are the run's requests
        decoded one at a time."""
        import numpy as np

        owner = [r for r, images in enumerate(requests) for _ in images]
        flat = [image for images in requests for image in images]
        first: dict[int, int] = {}  # request -> the index of its first image in flat
        for k, r in enumerate(owner):
            first.setdefault(r, k)
        decoded: list = [None] * len(flat)  # (the run's pixels, row) of each image
        failed: dict[int, DecodeError] = {}

        def refuse(r: int, exc: DecodeError, k: int | None) -> None:
            failed[r] = DecodeError(str(exc), None if k is None else k - first[r])

        def decode(members: list[int]) -> None:  # raises DecodeError, naming an index in flat
            try:
                array = self._decode([flat[k] for k in members])
            except DecodeError as exc:
                named = exc.sample is not None and exc.sample < len(members)
                raise DecodeError(str(exc), members[exc.sample] if named else None) from exc.__cause__
            for row, k in enumerate(members):
                decoded[k] = (array, row)

        sizes = None if pixels is None else [p for request in pixels for p in request]
        for run in self._runs(flat, sizes) if flat else []:
            members = [k for k in run if owner[k] not in failed]
            while members:
                try:
                    decode(members)
                except DecodeError as exc:
                    if exc.sample is not None:
                        refuse(owner[exc.sample], exc, exc.sample)
                        members = [k for k in members if owner[k] not in failed]
                        continue
                    for r in dict.fromkeys(owner[k] for k in members):  # DALI named none: request by request
                        try:
                            decode([k for k in members if owner[k] == r])
                        except DecodeError as exc_alone:
                            refuse(r, exc_alone, exc_alone.sample)
                break

        results: list = [None] * len(requests)
        for r, images in enumerate(requests):
            if r in failed:
                results[r] = failed[r]
            elif not images:
                dtype = np.float16 if self._args["pixels_dtype"] == "FP16" else np.float32
                results[r] = np.zeros((0, 3, PREPROCESSING.crop, PREPROCESSING.crop), dtype)
            else:
                parts = decoded[first[r] : first[r] + len(images)]
                array, row = parts[0]
                if all(a is array and k == row + i for i, (a, k) in enumerate(parts)):
                    results[r] = array[row : row + len(parts)]  # a view, as one run gave it
                else:
                    results[r] = np.stack([a[k] for a, k in parts])
        return results


_MODEL_HEADER = """\
# Generated for the {profile} profile by `build_engines.py configs` from tritonvision/spec.py and
# tritonvision_server/dali_graph.py (copied below verbatim). Do not edit: change those and regenerate.
# The Triton DALI backend autoserialises this file with the server image's own DALI when it loads the
# model, so the pipeline always matches the DALI that runs it. Needs only nvidia.dali.
"""

_MODEL_FOOTER = """

# --- the model ---------------------------------------------------------------------------------------

import nvidia.dali as dali  # noqa: E402
from nvidia.dali.plugin.triton import autoserialize  # noqa: E402


# batch_size, num_threads and the device are the DALI backend's to set from config.pbtxt when it loads the
# model; device_id=None lets the GPU pipeline serialise on a machine without CUDA (a Docker build, CI).
@autoserialize
@dali.pipeline_def(batch_size={batch_size}, num_threads={num_threads}, device_id=None)
def {name}():
    return preprocess_graph{args!r}
"""


def dali_model_source(profile) -> str:
    """The text of ``preprocess/1/dali.py`` for ``profile``: the graph with the GPU decoder, for autoserialisation."""
    graph = resources.files(__package__).joinpath("dali_graph.py").read_text(encoding="utf-8")
    footer = _MODEL_FOOTER.format(
        batch_size=profile.preprocess.batching.max_batch_size, num_threads=profile.cpu_threads, name="preprocess",
        args=_graph_args("mixed", profile.pixels_dtype, profile.hw_decoder_load,
                         PIXEL_COUNT.name if profile.validate is not None else None),
    )
    return _MODEL_HEADER.format(profile=profile.name) + graph + footer


def dali_version() -> str:
    return _dali().__version__


def autoserialize_model(model_file, target) -> None:
    """Serialise ``model_file`` (a generated ``dali.py``) into ``target`` with this machine's DALI, the way
    the Triton DALI backend does when it loads the model; raises if this DALI cannot build the pipeline."""
    import importlib.util
    import sys

    _dali()
    from nvidia.dali._utils.autoserialize import invoke_autoserialize

    name = "_tritonvision_dali_model"
    spec = importlib.util.spec_from_file_location(name, str(model_file))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        invoke_autoserialize(module, str(target))
    finally:
        sys.modules.pop(name, None)
