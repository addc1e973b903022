"""Every gRPC call the SDK makes goes through here: unary and callback inference through tritonclient,
the raw bidirectional stream for :mod:`._stream`, health, statistics and shared-memory registration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from .._types import Prediction
from ..spec import ENSEMBLE, IMAGE, SCORES
from ._errors import map_error

# tritonclient's defaults, plus a short reconnect backoff: gRPC otherwise waits up to two minutes before
# reconnecting to a restarted server, and every retry in between would fail at once with UNAVAILABLE.
MAX_MESSAGE_BYTES = 2**31 - 1
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class ShmInput:
    """An image already written to a registered shared-memory region."""

    region: str
    byte_size: int
    offset: int = 0


Payload = Union[bytes, ShmInput]


def infer_inputs(payload: Payload) -> list[grpcclient.InferInput]:
    if isinstance(payload, ShmInput):
        inp = grpcclient.InferInput(IMAGE.name, [1, payload.byte_size], IMAGE.dtype)
        inp.set_shared_memory(payload.region, payload.byte_size, payload.offset)
    else:
        inp = grpcclient.InferInput(IMAGE.name, [1, len(payload)], IMAGE.dtype)
        inp.set_data_from_numpy(np.frombuffer(payload, dtype=np.uint8)[None])
    return [inp]


def requested_outputs(top_k: int) -> list[grpcclient.InferRequestedOutput]:
    # class_count asks Triton's classification extension for "score:index:label" strings. The top-k
    # strings are a few hundred bytes, so the output always comes back in the response, never in shm.
    return [grpcclient.InferRequestedOutput(SCORES.name, class_count=top_k)]


def predictions(result) -> list[Prediction]:
    """The top-k predictions of the one image of an ``InferResult``."""
    table = result.as_numpy(SCORES.name)
    return [Prediction.parse(entry) for entry in table.reshape(-1)]


def stream_request(model: str, request_id: str, payload: Payload, top_k: int) -> service_pb2.ModelInferRequest:
    """The protobuf request of one image on the stream (the stream is driven without tritonclient's
    wrapper, which drops the request id of failed responses)."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    tensor = request.inputs.add(name=IMAGE.name, datatype=IMAGE.dtype)
    if isinstance(payload, ShmInput):
        tensor.shape.extend([1, payload.byte_size])
        tensor.parameters["shared_memory_region"].string_param = payload.region
        tensor.parameters["shared_memory_byte_size"].int64_param = payload.byte_size
        if payload.offset:
            tensor.parameters["shared_memory_offset"].int64_param = payload.offset
    else:
        tensor.shape.extend([1, len(payload)])
        request.raw_input_contents.append(payload)
    output = request.outputs.add(name=SCORES.name)
    output.parameters["classification"].int64_param = top_k
    return request


def stream_predictions(response: service_pb2.ModelInferResponse) -> list[Prediction]:
    return predictions(grpcclient.InferResult(response))


class GrpcTransport:
    """Owns one ``tritonclient.grpc.InferenceServerClient`` (and, once streaming, a channel for the stream)."""

    def __init__(self, url: str, *, model: str = ENSEMBLE, ssl: bool = False):
        self.url = url
        self.model = model
        self._ssl = ssl
        self._client = grpcclient.InferenceServerClient(url, ssl=ssl, channel_args=CHANNEL_ARGS)
        self._stream_channel: grpc.Channel | None = None

    # -- inference --------------------------------------------------------------------------------------
    def infer(self, payload: Payload, top_k: int, timeout: float | None = None) -> list[Prediction]:
        try:
            result = self._client.infer(
                self.model, infer_inputs(payload), outputs=requested_outputs(top_k), client_timeout=timeout
            )
            return predictions(result)
        except Exception as exc:
            raise map_error(exc) from exc

    def async_infer(self, payload: Payload, top_k: int, callback, timeout: float | None = None) -> None:
        """``callback(predictions, error)`` runs on a gRPC thread when the response arrives."""

        def done(result, error):
            if error is not None:
                callback(None, map_error(error))
                return
            try:
                preds = predictions(result)
            except Exception as exc:  # noqa: BLE001 - a malformed response is the server's failure
                callback(None, map_error(exc))
                return
            callback(preds, None)

        try:
            self._client.async_infer(
                self.model, infer_inputs(payload), done, outputs=requested_outputs(top_k), client_timeout=timeout
            )
        except Exception as exc:
            raise map_error(exc) from exc

    def open_stream(self, requests, timeout: float | None = None):
        """Start ``ModelStreamInfer`` fed by the iterator ``requests``; returns the call (iterate it for
        responses; ``.cancel()`` it to end)."""
        if self._stream_channel is None:
            self._stream_channel = (
                grpc.secure_channel(self.url, grpc.ssl_channel_credentials(), options=CHANNEL_ARGS)
                if self._ssl
                else grpc.insecure_channel(self.url, options=CHANNEL_ARGS)
            )
        stub = service_pb2_grpc.GRPCInferenceServiceStub(self._stream_channel)
        return stub.ModelStreamInfer(requests, timeout=timeout)

    # -- health and statistics -------------------------------------------------------------------------
    def is_ready(self, timeout: float | None = 2.0) -> bool:
        try:
            return self._client.is_server_ready(client_timeout=timeout) and self._client.is_model_ready(
                self.model, client_timeout=timeout
            )
        except Exception:  # noqa: BLE001 - unreachable means not ready
            return False

    def statistics(self, timeout: float | None = None) -> dict:
        """Triton's statistics of every model (``ModelStatisticsResponse`` as JSON)."""
        try:
            return self._client.get_inference_statistics("", as_json=True, client_timeout=timeout)
        except Exception as exc:
            raise map_error(exc) from exc

    # -- shared memory ---------------------------------------------------------------------------------
    def register_system_shm(self, name: str, key: str, byte_size: int) -> None:
        try:
            self._client.register_system_shared_memory(name, key, byte_size)
        except Exception as exc:
            raise map_error(exc) from exc

    def register_cuda_shm(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        try:
            self._client.register_cuda_shared_memory(name, raw_handle, device_id, byte_size)
        except Exception as exc:
            raise map_error(exc) from exc

    def unregister_shm(self, kind: str, name: str, timeout: float | None = 5.0) -> None:
        unregister = (
            self._client.unregister_cuda_shared_memory if kind == "cuda" else self._client.unregister_system_shared_memory
        )
        try:
            unregister(name, client_timeout=timeout)
        except Exception as exc:
            raise map_error(exc) from exc

    def registered_shm(self, kind: str = "system") -> list[str]:
        """Names of the regions the server has registered (of every client)."""
        status = (
            self._client.get_cuda_shared_memory_status if kind == "cuda" else self._client.get_system_shared_memory_status
        )
        try:
            return sorted(status(as_json=True).get("regions", {}))
        except Exception as exc:
            raise map_error(exc) from exc

    def close(self) -> None:
        if self._stream_channel is not None:
            self._stream_channel.close()
            self._stream_channel = None
        self._client.close()


class AsyncGrpcTransport:
    """Owns one ``tritonclient.grpc.aio.InferenceServerClient``; coroutines mirror :class:`GrpcTransport`."""

    def __init__(self, url: str, *, model: str = ENSEMBLE, ssl: bool = False):
        import tritonclient.grpc.aio as aioclient

        self.url = url
        self.model = model
        self._client = aioclient.InferenceServerClient(url, ssl=ssl, channel_args=CHANNEL_ARGS)

    async def infer(self, payload: Payload, top_k: int, timeout: float | None = None) -> list[Prediction]:
        try:
            result = await self._client.infer(
                self.model, infer_inputs(payload), outputs=requested_outputs(top_k), client_timeout=timeout
            )
            return predictions(result)
        except Exception as exc:
            raise map_error(exc) from exc

    async def is_ready(self, timeout: float | None = 2.0) -> bool:
        try:
            return await self._client.is_server_ready(client_timeout=timeout) and await self._client.is_model_ready(
                self.model, client_timeout=timeout
            )
        except Exception:  # noqa: BLE001 - unreachable means not ready
            return False

    async def statistics(self, timeout: float | None = None) -> dict:
        try:
            return await self._client.get_inference_statistics("", as_json=True, client_timeout=timeout)
        except Exception as exc:
            raise map_error(exc) from exc

    async def close(self) -> None:
        await self._client.close()
