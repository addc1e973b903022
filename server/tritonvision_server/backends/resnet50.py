"""cpu profile ``resnet50``: the exported ONNX file in ONNX Runtime, one session run per dynamic batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from ._common import parameters


class TritonPythonModel:
    def initialize(self, args):
        config, params = parameters(args)
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        path = Path(args["model_repository"]) / args["model_version"] / params.get("onnx_file", "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "2"))
        options.inter_op_num_threads = 1
        # Spinning between the parallel sections of one run saves a thread wake-up each; once the run ends,
        # the threads must stop spinning, or they steal the cores the server and the preprocess step need.
        options.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning", "1"))
        options.add_session_config_entry("session.force_spinning_stop", "1")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        batch = np.concatenate(inputs) if len(inputs) > 1 else inputs[0]
        (scores,) = self.session.run([self.output_name], {self.input_name: batch.astype(np.float32, copy=False)})
        responses, offset = [], 0
        for x in inputs:
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, scores[offset : offset + len(x)])]))
            offset += len(x)
        return responses
