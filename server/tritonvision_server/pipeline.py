"""The DALI preprocessing pipeline, shared by both profiles.

The cpu profile runs it inside a python-backend model with the CPU decoder; the gpu profile serialises the
same function with the GPU decoder (``device="mixed"``) into ``preprocess/1/model.dali`` for the DALI backend.
"""

from __future__ import annotations

from tritonvision.spec import IMAGE, PREPROCESSING

from tritonvision._extras import require

DECODER_DEVICES = ("cpu", "mixed")


def _dali():
    require("nvidia.dali", extra="server", what="the DALI preprocessing pipeline")
    from nvidia import dali

    return dali


def _centre_offset(fn, types, size, crop: int):
    """``round((size - crop) / 2)`` with Python's half-to-even rounding, in DALI integer arithmetic."""
    margin = fn.cast(size, dtype=types.INT32) - crop
    half = margin // 2
    return half + (margin - 2 * half) * (half - 2 * (half // 2))


def _pipeline_fn():
    dali = _dali()
    import nvidia.dali.math as dmath

    fn, types = dali.fn, dali.types
    p = PREPROCESSING

    # A pipeline_def function cannot take **kwargs, so every knob is a named argument.
    @dali.pipeline_def
    def preprocess_pipeline(decoder_device="cpu", pixels_dtype="FP32", hw_decoder_load=0.65):
        encoded = fn.external_source(name=IMAGE.name, dtype=types.UINT8, ndim=1, device="cpu")
        if decoder_device == "mixed":
            # hw_decoder_load: the share of each batch sent to the A100/H100 hardware JPEG decoder;
            # the rest goes to the CUDA decoder so both run at once.
            images = fn.decoders.image(encoded, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load)
        else:
            images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
        # torchvision's Resize truncates the long side (int(256 * long / short)) and CenterCrop rounds its
        # offset half-to-even; DALI's resize_shorter and crop_pos round differently, up to a pixel, so both
        # are computed here from the header's (EXIF-oriented) shape to match torchvision exactly.
        shape = fn.peek_image_shape(encoded, dtype=types.FLOAT)
        height, width = shape[0], shape[1]
        short = dmath.min(height, width)
        new_h = dmath.floor(height * float(p.resize_shorter) / short)
        new_w = dmath.floor(width * float(p.resize_shorter) / short)
        images = fn.resize(images, resize_y=new_h, resize_x=new_w, interp_type=types.INTERP_LINEAR)
        anchor = fn.stack(_centre_offset(fn, types, new_h, p.crop), _centre_offset(fn, types, new_w, p.crop))
        images = fn.slice(images, anchor, fn.constant(idata=[p.crop, p.crop], dtype=types.INT32), axes=[0, 1])
        return fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT16 if pixels_dtype == "FP16" else types.FLOAT,
            output_layout="CHW",
            mean=list(p.mean_255),
            std=list(p.std_255),
        )

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


class DecodeError(RuntimeError):
    """A pipeline run failed; ``sample`` is the index (in the images of the call) of the image DALI names
    as the one it could not decode, or None."""

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
    """Runs the pipeline on the CPU over lists of encoded images, returning ``[n, 3, crop, crop]`` arrays."""

    def __init__(self, *, max_batch_size: int, num_threads: int, pixels_dtype: str = "FP32"):
        self._args = dict(batch_size=max_batch_size, num_threads=num_threads, pixels_dtype=pixels_dtype)
        self.max_batch_size = max_batch_size
        self.rebuilds = 0
        self._pipe = self._start()

    def _start(self):
        pipe = build_pipeline(**self._args)
        pipe.build()
        return pipe

    def __call__(self, encoded: list):
        """Pixels of every image; :class:`DecodeError` if one fails (naming it when DALI does)."""
        import numpy as np

        if not encoded:
            raise ValueError("no images")
        out = []
        for start in range(0, len(encoded), self.max_batch_size):
            chunk = encoded[start : start + self.max_batch_size]
            self._pipe.feed_input(IMAGE.name, chunk)
            try:
                (pixels,) = self._pipe.run()
            except Exception as exc:
                # After a failed run DALI (2.4) declares the pipeline object invalid ("no longer valid"):
                # it cannot skip one bad sample or go on, so a failure costs a rebuild (~8-30 ms).
                self._pipe = self._start()
                self.rebuilds += 1
                index = _failed_sample(exc)
                raise DecodeError(str(exc), None if index is None else start + index) from exc
            out.append(pixels.as_array())
        return np.concatenate(out) if len(out) > 1 else out[0]

    def run_requests(self, requests: list[list]) -> list:
        """Pixels per request (a list of encoded images each), or the :class:`DecodeError` of a request
        whose image failed; the others are unaffected. The batch is run as one; when DALI names the image
        it could not decode, that request is set aside and the rest run again as one batch, so a bad image
        costs a rebuild and one rerun of its batch. Only when DALI names none is each request run alone."""
        results: list = [None] * len(requests)
        pending = list(range(len(requests)))
        while pending:
            flat, owner = [], []
            for r in pending:
                flat += requests[r]
                owner += [r] * len(requests[r])
            try:
                pixels = self(flat)
            except DecodeError as exc:
                if exc.sample is None or exc.sample >= len(owner):
                    break
                results[owner[exc.sample]] = exc
                pending.remove(owner[exc.sample])
                continue
            offset = 0
            for r in pending:
                results[r] = pixels[offset : offset + len(requests[r])]
                offset += len(requests[r])
            return results
        for r in pending:  # DALI named no sample: one request at a time
            try:
                results[r] = self(requests[r])
            except DecodeError as exc:
                results[r] = exc
        return results


def serialize_gpu_pipeline(path, profile) -> bool:
    """Write the ``mixed``-decoder pipeline of ``profile`` to ``path`` (``preprocess/1/model.dali``).

    Needs no GPU: the DALI backend supplies the device, batch size and threads when it loads the file.
    Returns False, writing nothing, when ``path`` already holds the same serialised pipeline.
    """
    from pathlib import Path

    path = Path(path)
    pipe = _pipeline_fn()(
        decoder_device="mixed",
        pixels_dtype=profile.pixels_dtype,
        hw_decoder_load=profile.hw_decoder_load,
        batch_size=profile.preprocess.batching.max_batch_size,
        num_threads=profile.cpu_threads,
        device_id=None,
    )
    data = pipe.serialize()
    if path.exists() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True
