"""A light stand-in for both steps of the cpu profile, for client and transport benchmarks.

Same interface as :mod:`.preprocess` and :mod:`.resnet50` (the repository's configs are unchanged), trivial
compute: ``LightPreprocess`` checks each image's header (so bad images still fail alone) and returns constant
pixels; ``LightResNet50`` returns fixed scores. On the CPU the real ResNet-50 step costs ~40 ms per image and
hides every client-side cost; with this variant the server answers about as fast as a GPU would make the
model look, so the client's and the transport's overhead show.

:func:`tritonvision_server.configs.write_light_repository` writes a repository that uses it.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonvision.spec import IMAGE, NUM_CLASSES

from ..imagecheck import InvalidImage, inspect_rows
from ._common import output_dtype, parameters, refusal


class LightPreprocess:
    def initialize(self, args):
        config, _ = parameters(args)
        self.name = config["output"][0]["name"]
        self.dtype = output_dtype(config, self.name)
        dims = [int(d) for d in config["output"][0]["dims"]]
        self.pixels = np.zeros([1, *dims], dtype=self.dtype)

    def execute(self, requests):
        responses = []
        for request in requests:
            array = pb_utils.get_input_tensor_by_name(request, IMAGE.name).as_numpy()
            if array.ndim == 1:
                array = array[None]
            try:
                inspect_rows(array)
            except InvalidImage as exc:
                responses.append(refusal("header", str(exc)))
                continue
            pixels = np.broadcast_to(self.pixels, (len(array), *self.pixels.shape[1:]))
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.name, np.ascontiguousarray(pixels))]))
        return responses


class LightResNet50:
    def initialize(self, args):
        config, _ = parameters(args)
        self.name = config["output"][0]["name"]
        self.input_name = config["input"][0]["name"]
        # A fixed, valid probability vector: class i gets a share falling with i, so top-k is stable.
        weights = 1.0 / np.arange(1, NUM_CLASSES + 1, dtype=np.float64)
        self.scores = (weights / weights.sum()).astype(np.float32)[None]

    def execute(self, requests):
        responses = []
        for request in requests:
            n = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().shape[0]
            scores = np.repeat(self.scores, n, axis=0)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.name, scores)]))
        return responses
