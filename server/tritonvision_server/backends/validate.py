"""gpu profile ``validate``: a per-request header check ahead of the DALI ``preprocess`` step.

The DALI backend runs a dynamic batch as one pipeline iteration and, when one sample fails to decode,
returns the same error to every request of the batch. This step runs in the ensemble before DALI and
checks each request on its own (:func:`..imagecheck.inspect`: format, size limits, JPEG/PNG end marker),
so a corrupt or truncated upload fails only its own request with INVALID_ARGUMENT; valid bytes pass on
unchanged as ``VALID_IMAGE``.
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from tritonvision.spec import IMAGE, VALID_IMAGE

from ..imagecheck import InvalidImage, inspect_rows
from ._common import error_response


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, IMAGE.name)
            array = tensor.as_numpy()
            try:
                inspect_rows(array)
            except InvalidImage as exc:
                responses.append(error_response(str(exc)))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(VALID_IMAGE.name, array)]))
        return responses
