"""Every gRPC call the SDK makes goes through here: inference (unary, callback and asyncio) on the raw
``GRPCInferenceService`` stub, the raw bidirectional stream for :mod:`._stream`, and health, statistics and
shared-memory registration through tritonclient.

Inference skips tritonclient's ``infer``/``async_infer`` on purpose: its ``InferInput``/numpy request
building, ``InferResult`` wrapping and numpy decoding of the top-k strings made up most of the SDK's client
CPU above a bare grpcio call (on two cores, ~370-480 us against ~250 us per request at concurrency 16; now
~300 us), and on a fast server that CPU is taken from the server. Requests are built as protobufs directly
and the classification strings are parsed from the raw response bytes.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Union

from tritonclient.grpc import service_pb2, service_pb2_grpc

from .._types import Prediction
from ..exceptions import ModelNotReadyError
from ..spec import ENSEMBLE, IMAGE, PREPROCESS, SCORES, VALIDATE
from ._channel import CHANNEL_ARGS, MAX_MESSAGE_BYTES, Connection, open_channel, triton_client  # noqa: F401
from ._errors import map_error


@dataclass(frozen=True)
class ShmInput:
    """An image already written to a registered shared-memory region."""

    region: str
    byte_size: int
    offset: int = 0


Payload = Union[bytes, ShmInput]


# The length prefix of each element of a serialized BYTES tensor.
_ELEMENT_SIZE = struct.Struct("<I").unpack_from


class MalformedResponseError(ValueError):
    """A response without the top-k output the request asked for."""


def infer_request(
    model: str, payload: Payload, top_k: int, request_id: str = "", timeout: float | None = None
) -> service_pb2.ModelInferRequest:
    """The protobuf request of one image: the encoded bytes (or a shared-memory reference) as a [1, n] UINT8
    tensor, asking for the top-k output. On the stream, ``request_id`` finds the image again, also in a
    failed response (tritonclient's stream wrapper drops the id of failed responses, so it is not used).

    ``timeout`` (seconds left of the caller's deadline) also goes to the server as the request parameter
    ``timeout`` (int64, microseconds; Triton 2.51 ``infer_handler.cc``), which the ensemble hands to each
    step: a step whose queue policy allows the override rejects the request once it has waited that long,
    so work whose caller has given up is dropped instead of computed."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    if timeout is not None:
        request.parameters["timeout"].int64_param = max(1, int(timeout * 1e6))
    tensor = request.inputs.add(name=IMAGE.name, datatype=IMAGE.dtype)
    if isinstance(payload, ShmInput):
        tensor.shape.extend((1, payload.byte_size))
        params = tensor.parameters
        params["shared_memory_region"].string_param = payload.region
        params["shared_memory_byte_size"].int64_param = payload.byte_size
        if payload.offset:
            params["shared_memory_offset"].int64_param = payload.offset
    else:
        tensor.shape.extend((1, len(payload)))
        request.raw_input_contents.append(payload)
    # class_count asks Triton's classification extension for "score:index:label" strings. The top-k
    # strings are a few hundred bytes, so the output always comes back in the response, never in shm.
    request.outputs.add(name=SCORES.name).parameters["classification"].int64_param = top_k
    return request


# Marks a request that asks again about an image the stream already had refused: the server's steps do
# not count it in tritonvision_refused_images_total a second time.
RECHECK_PARAMETER = "tritonvision_recheck"


# The step that checks an image's header first: validate (gpu profile), else preprocess (cpu profile).
CHECK_STEPS = (VALIDATE, PREPROCESS)


def check_request(step: str, data: bytes) -> service_pb2.ModelInferRequest:
    """The image sent to the first step alone: it answers INVALID_ARGUMENT for an image the ensemble
    refuses at that step, without running (and failing) the ensemble again."""
    request = service_pb2.ModelInferRequest(model_name=step)
    request.parameters[RECHECK_PARAMETER].bool_param = True
    request.inputs.add(name=IMAGE.name, datatype=IMAGE.dtype, shape=(1, len(data)))
    request.raw_input_contents.append(data)
    return request


def predictions(response: service_pb2.ModelInferResponse) -> list[Prediction]:
    """The top-k predictions of the one image of a ``ModelInferResponse``.

    The classification output is a BYTES tensor: each element is a 4-byte little-endian length followed by
    ``score:index:label``. Parsed here directly rather than through ``InferResult.as_numpy``, which builds
    a numpy object array element by element."""
    for position, output in enumerate(response.outputs):
        if output.name == SCORES.name:
            break
    else:
        raise MalformedResponseError(f"the response has no {SCORES.name} output")
    if position < len(response.raw_output_contents):
        raw = response.raw_output_contents[position]
        entries = []
        offset, end = 0, len(raw)
        try:
            while offset < end:
                (size,) = _ELEMENT_SIZE(raw, offset)
                offset += 4
                entries.append(raw[offset : offset + size])
                offset += size
        except struct.error:
            offset = end + 1
        if offset != end:
            raise MalformedResponseError(f"truncated {SCORES.name} output ({end} bytes)")
    else:  # the JSON-style typed contents, which Triton does not send over gRPC but the protocol allows
        entries = output.contents.bytes_contents
    return [Prediction.parse(entry) for entry in entries]


def _connection(url: str | Connection, ssl: bool) -> Connection:
    return url if isinstance(url, Connection) else Connection.make(url, ssl=ssl)


# Triton 2.51 checks a restricted gRPC protocol's key as metadata named with this prefix (grpc_server.h).
RESTRICTED_HEADER_PREFIX = "triton-grpc-protocol-"


def access_headers(access_key: tuple[str, str] | None) -> dict[str, str]:
    """The metadata that opens a server's restricted protocols (shared memory, model repository,
    statistics) started with ``--grpc-restricted-protocol=...:<name>=<value>``."""
    if access_key is None:
        return {}
    name, value = access_key
    if not name:
        raise ValueError("access_key needs a name: (name, value)")
    return {RESTRICTED_HEADER_PREFIX + name.lower(): value}


def with_access_key(headers: Mapping[str, str] | None, access_key: tuple[str, str] | None) -> dict[str, str] | None:
    """``headers`` plus the access key's header (the key wins over a header of the same name)."""
    if access_key is None:
        return dict(headers) if headers else None
    return {**{str(k).lower(): v for k, v in (headers or {}).items()}, **access_headers(access_key)}


def _closed() -> None:
    """The close of a client that is already closed."""


class GrpcTransport:
    """Owns one channel for inference and streaming, and a ``tritonclient.grpc.InferenceServerClient`` for
    health, statistics and shared-memory registration."""

    def __init__(self, url: str | Connection, *, model: str = ENSEMBLE, ssl: bool = False):
        self.connection = _connection(url, ssl)
        self.url = self.connection.target
        self.model = model
        self._headers = self.connection.header_dict
        self._client = triton_client(self.connection)
        self._channel = open_channel(self.connection)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._model_infer = self._stub.ModelInfer

    # -- inference --------------------------------------------------------------------------------------
    def infer(self, payload: Payload, top_k: int, timeout: float | None = None) -> list[Prediction]:
        try:
            return predictions(self._model_infer(infer_request(self.model, payload, top_k, timeout=timeout), timeout=timeout))
        except Exception as exc:
            raise map_error(exc) from exc

    def async_infer(self, payload: Payload, top_k: int, callback, timeout: float | None = None) -> None:
        """``callback(predictions, error)`` runs on a gRPC thread when the response arrives (or on this
        thread, if it already has)."""
        try:
            future = self._model_infer.future(infer_request(self.model, payload, top_k, timeout=timeout), timeout=timeout)
        except Exception as exc:
            raise map_error(exc) from exc

        def done(call) -> None:
            try:
                preds = predictions(call.result())
            except Exception as exc:  # noqa: BLE001 - the RPC's error, or a malformed response
                callback(None, map_error(exc))
                return
            callback(preds, None)

        future.add_done_callback(done)

    def check_image(self, data: bytes, timeout: float | None = None) -> bool:
        """Whether the ensemble's first step accepts ``data``; raises its :class:`InvalidImageError` when it
        does not. False where the server has none of :data:`CHECK_STEPS`."""
        for step in CHECK_STEPS:
            try:
                self._model_infer(check_request(step, data), timeout=timeout)
                return True
            except Exception as exc:  # noqa: BLE001 - mapped below
                error = map_error(exc)
                if not isinstance(error, ModelNotReadyError):  # NOT_FOUND: this profile has no such step
                    raise error from exc
        return False

    def open_stream(self, requests, timeout: float | None = None):
        """Start ``ModelStreamInfer`` fed by the iterator ``requests``; returns the call (iterate it for
        responses; ``.cancel()`` it to end)."""
        return self._stub.ModelStreamInfer(requests, timeout=timeout)

    # -- health and statistics -------------------------------------------------------------------------
    def is_ready(self, timeout: float | None = 2.0) -> bool:
        try:
            return self._client.is_server_ready(headers=self._headers, client_timeout=timeout) and self._client.is_model_ready(
                self.model, headers=self._headers, client_timeout=timeout
            )
        except Exception:  # noqa: BLE001 - unreachable means not ready
            return False

    def statistics(self, timeout: float | None = None) -> dict:
        """Triton's statistics of every model (``ModelStatisticsResponse`` as JSON)."""
        try:
            return self._client.get_inference_statistics("", headers=self._headers, as_json=True, client_timeout=timeout)
        except Exception as exc:
            raise map_error(exc) from exc

    # -- shared memory ---------------------------------------------------------------------------------
    def register_system_shm(self, name: str, key: str, byte_size: int) -> None:
        try:
            self._client.register_system_shared_memory(name, key, byte_size, headers=self._headers)
        except Exception as exc:
            raise map_error(exc) from exc

    def register_cuda_shm(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        try:
            self._client.register_cuda_shared_memory(name, raw_handle, device_id, byte_size, headers=self._headers)
        except Exception as exc:
            raise map_error(exc) from exc

    def unregister_shm(self, kind: str, name: str, timeout: float | None = 5.0) -> None:
        unregister = (
            self._client.unregister_cuda_shared_memory if kind == "cuda" else self._client.unregister_system_shared_memory
        )
        try:
            unregister(name, headers=self._headers, client_timeout=timeout)
        except Exception as exc:
            raise map_error(exc) from exc

    def registered_shm(self, kind: str = "system") -> list[str]:
        """Names of the regions the server has registered (of every client)."""
        status = (
            self._client.get_cuda_shared_memory_status if kind == "cuda" else self._client.get_system_shared_memory_status
        )
        try:
            return sorted(status(headers=self._headers, as_json=True).get("regions", {}))
        except Exception as exc:
            raise map_error(exc) from exc

    def close(self) -> None:
        try:
            self._channel.close()
        finally:
            # tritonclient closes its channel once more in __del__. Under gevent (Locust) grpc counts open
            # channels, and that second close miscounts and can hang the interpreter at exit: close once.
            self._client.close()
            self._client.close = _closed


class AsyncGrpcTransport:
    """The asyncio twin of :class:`GrpcTransport`: a ``grpc.aio`` channel for inference and a
    ``tritonclient.grpc.aio.InferenceServerClient`` for the rest."""

    def __init__(self, url: str | Connection, *, model: str = ENSEMBLE, ssl: bool = False):
        self.connection = _connection(url, ssl)
        self.url = self.connection.target
        self.model = model
        self._headers = self.connection.header_dict
        self._client = triton_client(self.connection, aio=True)
        self._channel = open_channel(self.connection, aio=True)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        # The connection's headers go with every call as its metadata (see open_channel).
        self._metadata = self.connection.headers or None
        self._model_infer = functools.partial(self._stub.ModelInfer, metadata=self._metadata)

    async def infer(self, payload: Payload, top_k: int, timeout: float | None = None) -> list[Prediction]:
        try:
            return predictions(
                await self._model_infer(infer_request(self.model, payload, top_k, timeout=timeout), timeout=timeout)
            )
        except Exception as exc:
            raise map_error(exc) from exc

    async def check_image(self, data: bytes, timeout: float | None = None) -> bool:
        """As :meth:`GrpcTransport.check_image`."""
        for step in CHECK_STEPS:
            try:
                await self._model_infer(check_request(step, data), timeout=timeout)
                return True
            except Exception as exc:  # noqa: BLE001 - mapped below
                error = map_error(exc)
                if not isinstance(error, ModelNotReadyError):  # NOT_FOUND: this profile has no such step
                    raise error from exc
        return False

    def open_stream(self, timeout: float | None = None):
        """Start ``ModelStreamInfer``; ``await call.write(request)``, iterate the call for responses,
        ``await call.done_writing()`` to half-close, ``call.cancel()`` to end."""
        return self._stub.ModelStreamInfer(timeout=timeout, metadata=self._metadata)

    async def is_ready(self, timeout: float | None = 2.0) -> bool:
        try:
            return await self._client.is_server_ready(headers=self._headers, client_timeout=timeout) and await self._client.is_model_ready(
                self.model, headers=self._headers, client_timeout=timeout
            )
        except Exception:  # noqa: BLE001 - unreachable means not ready
            return False

    async def statistics(self, timeout: float | None = None) -> dict:
        try:
            return await self._client.get_inference_statistics("", headers=self._headers, as_json=True, client_timeout=timeout)
        except Exception as exc:
            raise map_error(exc) from exc

    async def close(self) -> None:
        try:
            await self._channel.close()
        finally:
            await self._client.close()
