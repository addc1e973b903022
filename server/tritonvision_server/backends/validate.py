"""gpu profile ``validate``: a per-request header check ahead of the DALI ``preprocess`` step.

The DALI backend runs a dynamic batch as one pipeline iteration and, when one sample fails to decode,
returns the same error to every request of the batch. This step runs in the ensemble before DALI and
checks each request on its own (:func:`..imagecheck.inspect`: format, size limits, JPEG/PNG end marker,
PNG/WebP chunks within the file),
so a corrupt or truncated upload fails only its own request with INVALID_ARGUMENT. An accepted image gets
its decoded pixel count (``PIXEL_COUNT``, width x height from the header), which ``preprocess`` waits for and
Triton's batcher sums against the pixel budget of a DALI batch; the image itself goes to DALI straight from
the ensemble's input, so it is never copied back out of this step.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonvision.spec import IMAGE, PIXEL_COUNT

from ..batchstrategy import REQUEST_PIXELS_PARAMETER
from ..imagecheck import ImageInfo, InvalidImage, inspect, inspect_rows, webp_orientation
from ._common import parameters, refusal


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


def pixel_counts(rows, max_request_pixels: int = 0) -> np.ndarray:
    """The ``[images, 1]`` INT64 pixel counts of a request's images, after the header check of each; raises
    :class:`InvalidImage` when one is refused, or when together they exceed ``max_request_pixels`` (0: no
    limit): the batcher never splits a request, so one that large would be a DALI batch over the budget."""
    counts = np.array([[info.width * info.height] for info in inspect_rows(rows, check)], dtype=np.int64)
    total = int(counts.sum())
    if max_request_pixels and total > max_request_pixels:
        raise InvalidImage(f"the request's {len(counts)} images hold {total / 1e6:.1f} megapixels together, over the "
                           f"limit of {max_request_pixels / 1e6:g} for one request: send them in smaller requests")
    return counts


class TritonPythonModel:
    def initialize(self, args):
        _, params = parameters(args)
        self.max_request_pixels = int(params.get(REQUEST_PIXELS_PARAMETER, "0"))

    def execute(self, requests):
        responses = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, IMAGE.name).as_numpy()
            try:
                counts = pixel_counts(rows, self.max_request_pixels)
            except InvalidImage as exc:
                responses.append(refusal("header", str(exc)))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(PIXEL_COUNT.name, counts)]))
        return responses
