"""A stand-in for the gpu profile's DALI ``preprocess`` that records the batches Triton hands it.

Triton's batcher applies the pixel budget (:mod:`..batchstrategy`) before any backend sees a batch, so a
python-backend model with the generated ``preprocess`` config receives the batches the DALI backend would.
This one appends each batch's pixel counts (one sum per request, from ``PIXEL_COUNT``) as a JSON line to
the file its ``batch_log`` parameter names, waits ``execute_seconds`` (so that requests queue behind busy
instances, as behind DALI under load) and answers zero pixels. Used by the tests and
``benchmarks/batch_budget.py`` (:func:`..configs.write_batch_recorder_repository`).
"""

from __future__ import annotations

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonvision.spec import PIXEL_COUNT

from ._common import output_dtype, parameters


class BatchRecorder:
    def initialize(self, args):
        config, params = parameters(args)
        self.log, self.seconds = params["batch_log"], float(params["execute_seconds"])
        self.name = config["output"][0]["name"]
        self.dims = [int(d) for d in config["output"][0]["dims"]]
        self.dtype = output_dtype(config, self.name)

    def execute(self, requests):
        counts = [pb_utils.get_input_tensor_by_name(r, PIXEL_COUNT.name).as_numpy() for r in requests]
        # One write of one line per batch: the instances (stub processes) append to the same file.
        with open(self.log, "a") as log:
            log.write(json.dumps([int(c.sum()) for c in counts]) + "\n")
        time.sleep(self.seconds)
        return [pb_utils.InferenceResponse([pb_utils.Tensor(self.name, np.zeros([len(c), *self.dims], self.dtype))])
                for c in counts]
