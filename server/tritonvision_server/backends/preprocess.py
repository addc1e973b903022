"""cpu profile ``preprocess``: header checks, then the DALI pipeline on the CPU over the whole dynamic batch.

DALI fails a whole batch when one image fails to decode. Requests are therefore checked one by one first
(:mod:`..imagecheck`), and if decoding the batch still fails (damage only decoding finds), the request
whose image DALI names is refused and the rest of the batch decoded again
(:meth:`..pipeline.CpuPreprocessor.run_requests`), so only the broken ones get an error.

The sizes the header check read split the batch into decoder runs of at most ``spec.IMAGE_LIMITS.max_run_pixels``
(:func:`..pipeline.decoder_runs`): DALI keeps the buffers of its largest run, so a batch of many large
images is decoded a run at a time, while a batch of ordinary photos is still one run.

Between the checks and the decode, admission (:mod:`..admission`) holds the batch until ``resnet50`` can
queue it, so that overload is refused here, undecoded, not at ``resnet50`` after the work.
"""

from __future__ import annotations

import logging

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonvision.spec import IMAGE

from ..imagecheck import InvalidImage, inspect_rows
from ..pipeline import CpuPreprocessor, DecodeError
from ._common import admission, admit, decode_error_message, error_response, output_dtype, parameters, refusal

log = logging.getLogger(__name__)


class TritonPythonModel:
    def initialize(self, args):
        config, params = parameters(args)
        self.pixels_name = config["output"][0]["name"]
        self.dtype = output_dtype(config, self.pixels_name)
        self.pre = CpuPreprocessor(
            max_batch_size=config["max_batch_size"],
            num_threads=int(params.get("num_threads", "2")),
            pixels_dtype="FP16" if self.dtype == np.float16 else "FP32",
        )
        self.admission = admission(params)

    def _samples(self, request):
        """The request's images, their formats and their pixel counts (width x height from the header)."""
        array = pb_utils.get_input_tensor_by_name(request, IMAGE.name).as_numpy()
        infos = inspect_rows(array)
        rows = array.reshape(1, -1) if array.ndim == 1 else array
        samples = [np.ascontiguousarray(row) for row in rows]
        return samples, [i.format for i in infos], [i.width * i.height for i in infos]

    def finalize(self):
        if self.admission is not None:
            self.admission.close()

    def execute(self, requests):
        responses = [None] * len(requests)
        work = []  # (request index, samples, formats, pixels)
        for i, request in enumerate(requests):
            try:
                samples, formats, pixels = self._samples(request)
            except InvalidImage as exc:
                responses[i] = refusal("header", str(exc))
                continue
            work.append((i, samples, formats, pixels))
        if work and self.admission is not None:
            # Only requests that passed the header check go on to resnet50; the newest are refused first.
            kept = set(admit(self.admission, requests, {w[0]: len(w[1]) for w in work}, responses))
            work = [w for w in work if w[0] in kept]
        if work:
            try:
                outcomes = self.pre.run_requests([w[1] for w in work], pixels=[w[3] for w in work])
            except Exception as exc:  # noqa: BLE001 - anything but a decode failure: fail this batch only
                log.exception("preprocessing failed")
                for w in work:
                    responses[w[0]] = error_response(f"preprocessing failed: {exc}", invalid_argument=False)
                return responses
            for (i, _, formats, _), outcome in zip(work, outcomes):
                if isinstance(outcome, DecodeError):
                    # Refused once, and counted once: run_requests sets a failed request aside for good.
                    responses[i] = refusal("decode", decode_error_message(formats[0]))
                else:
                    responses[i] = self._response(outcome)
        return responses

    def _response(self, pixels):
        return pb_utils.InferenceResponse([pb_utils.Tensor(self.pixels_name, pixels.astype(self.dtype, copy=False))])
