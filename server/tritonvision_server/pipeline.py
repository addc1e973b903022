"""The DALI preprocessing pipeline, shared by both profiles.

The graph itself is :func:`.dali_graph.preprocess_graph`. The cpu profile runs it here, inside a
python-backend model, with the CPU decoder; the gpu profile ships the same function, with the GPU decoder
(``device="mixed"``), as ``preprocess/1/dali.py``, which the Triton DALI backend autoserialises with the
server image's own DALI (:func:`dali_model_source`).
"""

from __future__ import annotations

from importlib import resources

from tritonvision.spec import ACCEPTED, IMAGE, PREPROCESSING

from tritonvision.extras import require

DECODER_DEVICES = ("cpu", "mixed")


def _dali():
    require("nvidia.dali", extra="server", what="the DALI preprocessing pipeline")
    from nvidia import dali

    return dali


def _graph_args(decoder_device: str, pixels_dtype: str, hw_decoder_load: float, accepted: str | None = None) -> tuple:
    """The arguments of :func:`.dali_graph.preprocess_graph`, in order, from the spec."""
    p = PREPROCESSING
    return (IMAGE.name, accepted, decoder_device, pixels_dtype, hw_decoder_load, p.resize_shorter, p.crop, p.mean_255,
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
                         ACCEPTED.name if profile.validate is not None else None),
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
