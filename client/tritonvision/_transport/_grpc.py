"""Unary gRPC calls to the ensemble through tritonclient."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient

from ..spec import ENSEMBLE, IMAGE, SCORES
from .._types import Prediction
from ._errors import map_error


def infer_inputs(tensor: np.ndarray) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput(IMAGE.name, list(tensor.shape), IMAGE.dtype)
    inp.set_data_from_numpy(tensor)
    return [inp]


def requested_outputs(top_k: int) -> list[grpcclient.InferRequestedOutput]:
    # class_count asks Triton's classification extension for "score:index:label" strings.
    return [grpcclient.InferRequestedOutput(SCORES.name, class_count=top_k)]


def predictions(result) -> list[list[Prediction]]:
    """Per batch item, the top-k predictions from an ``InferResult``."""
    table = result.as_numpy(SCORES.name)
    if table.ndim == 1:
        table = table[None]
    return [[Prediction.parse(entry) for entry in row] for row in table]


class GrpcTransport:
    """Owns one ``tritonclient.grpc.InferenceServerClient``."""

    def __init__(self, url: str, *, model: str = ENSEMBLE, ssl: bool = False):
        self.url = url
        self.model = model
        self._client = grpcclient.InferenceServerClient(url, ssl=ssl)

    def infer(self, tensor: np.ndarray, top_k: int, timeout: float | None = None) -> list[list[Prediction]]:
        try:
            result = self._client.infer(self.model, infer_inputs(tensor), outputs=requested_outputs(top_k), client_timeout=timeout)
        except Exception as exc:
            raise map_error(exc) from exc
        return predictions(result)

    def async_infer(self, tensor: np.ndarray, top_k: int, callback, timeout: float | None = None) -> None:
        """``callback(predictions, error)`` runs on a gRPC thread when the response arrives."""

        def done(result, error):
            if error is not None:
                callback(None, map_error(error))
            else:
                try:
                    callback(predictions(result), None)
                except Exception as exc:  # noqa: BLE001 - a malformed response is the server's failure
                    callback(None, map_error(exc))

        try:
            self._client.async_infer(
                self.model, infer_inputs(tensor), done, outputs=requested_outputs(top_k), client_timeout=timeout
            )
        except Exception as exc:
            raise map_error(exc) from exc

    def is_ready(self) -> bool:
        try:
            return self._client.is_server_ready() and self._client.is_model_ready(self.model)
        except Exception:  # noqa: BLE001 - unreachable means not ready
            return False

    def close(self) -> None:
        self._client.close()
