"""gpu profile ``validate``: a per-request header check ahead of the DALI ``preprocess`` step.

The DALI backend runs a dynamic batch as one pipeline iteration and, when one sample fails to decode,
returns the same error to every request of the batch. This step runs in the ensemble before DALI and
checks each request on its own (:func:`..imagecheck.inspect`: format, size limits, JPEG/PNG end marker),
so a corrupt or truncated upload fails only its own request with INVALID_ARGUMENT. An accepted image gets
the one-byte verdict ``ACCEPTED``, which ``preprocess`` waits for; the image itself goes to DALI straight
from the ensemble's input, so it is never copied back out of this step.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonvision.spec import ACCEPTED, IMAGE

from ..imagecheck import InvalidImage, inspect_rows
from ._common import refusal


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, IMAGE.name).as_numpy()
            try:
                inspect_rows(rows)
            except InvalidImage as exc:
                responses.append(refusal("header", str(exc)))
                continue
            verdict = np.ones((rows.shape[0] if rows.ndim > 1 else 1, 1), dtype=np.uint8)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(ACCEPTED.name, verdict)]))
        return responses
