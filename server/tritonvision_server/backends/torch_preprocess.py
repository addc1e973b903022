"""gpu-torch profile ``preprocess``: header checks, then nvJPEG batch decode and resize/crop/normalise in PyTorch.

Each request is header-checked on its own first (:mod:`..imagecheck`), as in the other profiles. The accepted
images of the dynamic batch are decoded in nvJPEG batch calls (the CPU decoder for formats nvJPEG does not
take) of at most ``spec.IMAGE_LIMITS.max_run_pixels`` pixels, from the sizes the header check read, each
resized before the next is decoded (:func:`..torch_pipeline.preprocess_runs`): a batch of ordinary photos is
one call, a batch of large images takes the memory of one run. An image that fails to decode fails only its
own request (:func:`..torch_pipeline.decode` retries a failed call image by image). The pixels stay in GPU
memory and leave through DLPack: the python backend hands them to ``resnet50`` (whose inputs are not forced to
the CPU) without a copy through host memory.

Model parameters: ``device`` (``cuda``: the instance's GPU; ``cpu``: the override that runs the same code
without a GPU), ``num_threads`` (PyTorch's CPU threads) and ``admission_*`` (:mod:`..admission`, which holds a
checked batch until ``resnet50`` can queue it).
"""

from __future__ import annotations

import logging

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonvision.spec import IMAGE

from ..imagecheck import InvalidImage, inspect_rows
from ._common import admission, admit, decode_error_message, error_response, output_dtype, parameters, refusal

log = logging.getLogger(__name__)


class TritonPythonModel:
    def initialize(self, args):
        from .. import torch_pipeline as tp

        self.tp = tp
        config, params = parameters(args)
        self.pixels_name = config["output"][0]["name"]
        self.dtype = tp.torch.float16 if output_dtype(config, self.pixels_name) == np.float16 else tp.torch.float32
        self.device = tp.device_for(params.get("device", "cuda"), args.get("model_instance_device_id"))
        tp.torch.set_num_threads(int(params.get("num_threads", "2")))
        self.normalise = tp.Normaliser(self.device, self.dtype)
        self.admission = admission(params)
        log.info("preprocess runs on %s", self.device)

    def finalize(self):
        if self.admission is not None:
            self.admission.close()

    def _rows(self, request):
        """The request's images, their formats and their pixel counts (width x height from the header)."""
        array = pb_utils.get_input_tensor_by_name(request, IMAGE.name).as_numpy()
        infos = inspect_rows(array)
        rows = array.reshape(1, -1) if array.ndim == 1 else array
        return list(rows), [i.format for i in infos], [i.width * i.height for i in infos]

    def execute(self, requests):
        tp = self.tp
        responses = [None] * len(requests)
        checked = {}  # request index -> (rows, formats, pixel counts)
        for i, request in enumerate(requests):
            try:
                checked[i] = self._rows(request)
            except InvalidImage as exc:
                responses[i] = refusal("header", str(exc))
        if checked and self.admission is not None:
            kept = admit(self.admission, requests, {i: len(rows) for i, (rows, _, _) in checked.items()}, responses)
            checked = {i: checked[i] for i in kept}
        if not checked:
            return responses
        work, rows, sizes = [], [], []  # (request index, first row, row count, formats)
        for i, (request_rows, formats, request_sizes) in checked.items():
            work.append((i, len(rows), len(request_rows), formats))
            rows += request_rows
            sizes += request_sizes
        try:
            with tp.torch.inference_mode():
                pixels, where = tp.preprocess_runs(rows, sizes, self.device, self.normalise)
        except Exception as exc:  # noqa: BLE001 - anything but a decode failure: fail this batch only
            log.exception("preprocessing failed")
            for i, _, _, _ in work:
                responses[i] = error_response(f"preprocessing failed: {exc}", invalid_argument=False)
            return responses
        for i, start, n, formats in work:
            if any(isinstance(w, tp.DecodeFailed) for w in where[start : start + n]):
                responses[i] = refusal("decode", decode_error_message(formats[0]))
                continue
            # A request's images are consecutive in the pixels, and a slice along the batch axis is contiguous;
            # from_dlpack syncs the producing stream (r24.10 PbTensor::FromDLPack), so the pixels are complete
            # when Triton takes them.
            part = pixels[where[start] : where[start] + n]
            responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack(self.pixels_name, part)])
        return responses
