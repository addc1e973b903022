"""gpu-torch profile ``resnet50``: ResNet-50 in PyTorch (FP16, channels-last, CUDA graphs) over each dynamic batch.

``PIXELS`` arrive where ``preprocess`` left them (the config sets ``FORCE_CPU_ONLY_INPUT_TENSORS: "no"``):
in GPU memory, taken through DLPack without a copy; a request sent directly with host-memory pixels works
too. The batch is padded to the next batch size with a captured CUDA graph
(:class:`..torch_pipeline.GraphRunner`). Scores (4 KB an image) are returned in host memory, bound for
the client anyway.

Model parameters: ``weights_file`` (the state dict in the version folder), ``device`` (``cuda`` | ``cpu``),
``precision`` (fp16 | tf32 | fp32, on CUDA) and ``cuda_graph_batch_sizes`` (comma-separated; none on the CPU).
"""

from __future__ import annotations

import logging
from pathlib import Path

import triton_python_backend_utils as pb_utils

from ._common import error_response, parameters, scores_response

log = logging.getLogger(__name__)


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(",") if s.strip())


class TritonPythonModel:
    def initialize(self, args):
        from .. import torch_pipeline as tp

        self.tp = tp
        config, params = parameters(args)
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.device = tp.device_for(params.get("device", "cuda"), args.get("model_instance_device_id"))
        weights = Path(args["model_repository"]) / args["model_version"] / params.get("weights_file", "model.pt")
        model, self.dtype = tp.load_resnet50(weights, self.device, params.get("precision", "fp16"))
        on_gpu = self.device.type == "cuda"
        sizes = _sizes(params.get("cuda_graph_batch_sizes", "")) if on_gpu else ()
        self.run = tp.GraphRunner(model, sizes, device=self.device, input_dtype=self.dtype, capture=on_gpu)
        log.info("resnet50 runs on %s (%s), CUDA graphs for %s", self.device, self.dtype, list(sizes) or "none")

    def _pixels(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
        torch = self.tp.torch
        if tensor.is_cpu():
            return torch.from_numpy(tensor.as_numpy()).to(self.device, non_blocking=True)
        return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).to(self.device)

    def execute(self, requests):
        torch = self.tp.torch
        responses: list = [None] * len(requests)
        inputs = [self._pixels(r) for r in requests]
        batch = torch.cat(inputs) if len(inputs) > 1 else inputs[0]
        # The model is reachable directly, not only through the ensemble: NaN/inf pixels would come back as
        # NaN scores with 200 OK. One reduction and one small copy per batch.
        finite = torch.isfinite(batch).flatten(1).all(dim=1).cpu().tolist()
        keep, offset, slots = [], 0, []
        for i, x in enumerate(inputs):
            n = x.shape[0]
            if all(finite[offset : offset + n]):
                keep.append(x)
                slots.append(i)
            else:
                responses[i] = error_response(f"{self.input_name} holds NaN or infinite values")
            offset += n
        if not keep:
            return responses
        if len(keep) != len(inputs):
            batch = torch.cat(keep)
        scores = self.run(batch).cpu().numpy()
        offset = 0
        for i, x in zip(slots, keep):
            n = x.shape[0]
            responses[i] = scores_response(self, scores[offset : offset + n])
            offset += n
        return responses
