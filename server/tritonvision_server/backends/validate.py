"""gpu profile ``validate``: a per-request header check ahead of the DALI ``preprocess`` step.

The DALI backend runs a dynamic batch as one pipeline iteration and, when one sample fails to decode,
returns the same error to every request of the batch. This step runs in the ensemble before DALI and
checks each request on its own (:func:`..imagecheck.inspect`: format, size limits, JPEG/PNG end marker,
PNG/WebP chunks within the file),
so a corrupt or truncated upload fails only its own request with INVALID_ARGUMENT. An accepted image gets
the one-byte verdict ``ACCEPTED``, which ``preprocess`` waits for; the image itself goes to DALI straight
from the ensemble's input, so it is never copied back out of this step.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonvision.spec import ACCEPTED, IMAGE

from ..imagecheck import ImageInfo, InvalidImage, inspect, inspect_rows, webp_orientation
from ._common import refusal


def check(row: bytes) -> ImageInfo:
    """The header check, and what this profile's DALI cannot decode right: the DALI of NGC 26.02-26.06
    (1.53.0 to 2.1.1) decodes a WebP whose EXIF orientation turns it into pixels of no orientation at all
    (DALI 2.4 turns it upright; ``tests/test_dali_versions.py`` watches both), so such a WebP is refused,
    not classified as noise."""
    info = inspect(row)
    if info.format == "webp" and (orientation := webp_orientation(row)) != 1:
        raise InvalidImage(f"WebP images with an EXIF orientation ({orientation}) are not accepted by this server, "
                           "whose decoder does not turn them upright: send the image upright or as JPEG")
    return info


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, IMAGE.name).as_numpy()
            try:
                inspect_rows(rows, check)
            except InvalidImage as exc:
                responses.append(refusal("header", str(exc)))
                continue
            verdict = np.ones((rows.shape[0] if rows.ndim > 1 else 1, 1), dtype=np.uint8)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(ACCEPTED.name, verdict)]))
        return responses
