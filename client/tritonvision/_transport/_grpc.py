"""Every gRPC call the SDK makes goes through here, on one channel and the raw ``GRPCInferenceService``
stub: inference (unary, callback and asyncio), the bidirectional stream for :mod:`._stream`, and the
control calls (readiness, statistics, shared-memory registration). tritonclient provides the protobufs
and the shared-memory utilities, not the calls: its ``InferenceServerClient`` would be a second channel
with errors of its own.

Inference skips tritonclient's ``infer``/``async_infer`` on purpose: its ``InferInput``/numpy request
building, ``InferResult`` wrapping and numpy decoding of the top-k strings made up most of the SDK's client
CPU above a bare grpcio call (on two cores, ~370-480 us against ~250 us per request at concurrency 16; now
~300 us), and on a fast server that CPU is taken from the server. Requests are built as protobufs directly
and the classification strings are parsed from the raw response bytes.

A transport given a shared-memory kind owns its :class:`._shm.ShmPool`: callers hand it encoded bytes and
never see a region.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
import weakref
from collections.abc import Mapping
from typing import Union

from google.protobuf.json_format import MessageToDict
from tritonclient.grpc import service_pb2, service_pb2_grpc

from .._retry import Deadline
from .._types import Prediction
from ..exceptions import ServerUnavailableError, TritonVisionError
from ..spec import ENSEMBLE, IMAGE, SCORES
from ._channel import CHANNEL_ARGS, Connection, open_channel  # noqa: F401 - CHANNEL_ARGS: the benchmarks' bare loop
from ._errors import map_error
from ._shm import ShmInput, ShmPool

log = logging.getLogger(__name__)

Payload = Union[bytes, ShmInput]

# The longest timeout a call is given, ~3 years: grpcio (1.85) fails a call at once whose deadline lies past
# 2^63 ns after 1970 (a timeout over ~7e9 s), threading's waits stop at ~9.2e9 s, and Triton takes a request's
# timeout as int64 microseconds. A longer timeout is cut to this one, which means the same.
MAX_TIMEOUT_S = 1e8


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


def _json(message) -> dict:
    """A control response as JSON-style data (int64 fields as strings), as tritonclient's ``as_json``."""
    return MessageToDict(message, preserving_proto_field_name=True)


def _call(method, request, timeout: float | None = None):
    try:
        return method(request, timeout=timeout)
    except Exception as exc:
        raise map_error(exc) from exc


def _servers(conn: Connection) -> list[Connection]:
    try:
        return conn.servers()
    except OSError as exc:
        raise ServerUnavailableError(f"cannot resolve {conn.target}: {exc}") from exc


class ShmCalls:
    """The shared-memory registration calls (a :class:`._shm.Registrar`). A pool's finalizer keeps this
    alive, not the transport that owns the pool: the pool is then collected with its transport, and its
    regions are still unregistered."""

    def __init__(self, stub: service_pb2_grpc.GRPCInferenceServiceStub):
        self._stub = stub

    def register_system_shm(self, name: str, key: str, byte_size: int, timeout: float | None = None) -> None:
        request = service_pb2.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=0, byte_size=byte_size)
        _call(self._stub.SystemSharedMemoryRegister, request, timeout)

    def register_cuda_shm(self, name: str, raw_handle: bytes, device_id: int, byte_size: int,
                          timeout: float | None = None) -> None:
        request = service_pb2.CudaSharedMemoryRegisterRequest(name=name, raw_handle=raw_handle, device_id=device_id,
                                                              byte_size=byte_size)
        _call(self._stub.CudaSharedMemoryRegister, request, timeout)

    def unregister_shm(self, kind: str, name: str, timeout: float | None = 5.0) -> None:
        if kind == "cuda":
            _call(self._stub.CudaSharedMemoryUnregister, service_pb2.CudaSharedMemoryUnregisterRequest(name=name), timeout)
        else:
            _call(self._stub.SystemSharedMemoryUnregister, service_pb2.SystemSharedMemoryUnregisterRequest(name=name), timeout)

    def registered_shm(self, kind: str = "system", timeout: float | None = None) -> list[str]:
        if kind == "cuda":
            status = _call(self._stub.CudaSharedMemoryStatus, service_pb2.CudaSharedMemoryStatusRequest(), timeout)
        else:
            status = _call(self._stub.SystemSharedMemoryStatus, service_pb2.SystemSharedMemoryStatusRequest(), timeout)
        return sorted(status.regions)


class GrpcTransport:
    """One channel to one server: inference, streaming and control calls, and, given ``shm``, the pool of
    shared-memory regions its images travel in."""

    def __init__(self, url: str | Connection, *, model: str = ENSEMBLE, ssl: bool = False, shm: str | None = None,
                 device_id: int = 0):
        self.connection = _connection(url, ssl)
        self.url = self.connection.target
        self.model = model
        self._channel = open_channel(self.connection)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._model_infer = self._stub.ModelInfer
        self.shm_calls = ShmCalls(self._stub)
        self.pool: ShmPool | None = None
        if shm:
            try:
                self.pool = ShmPool(self.shm_calls, shm, device_id=device_id)
            except BaseException:
                self._channel.close()
                raise

    # -- inference --------------------------------------------------------------------------------------
    def _infer(self, payload: Payload, top_k: int, timeout: float | None) -> list[Prediction]:
        try:
            return predictions(self._model_infer(infer_request(self.model, payload, top_k, timeout=timeout), timeout=timeout))
        except Exception as exc:
            raise map_error(exc) from exc

    def infer(self, data: bytes, top_k: int, timeout: float | None = None) -> list[Prediction]:
        """One image's top-k, through a shared-memory region when the transport has a pool."""
        if self.pool is None:
            return self._infer(data, top_k, timeout)
        # Registering a region counts against the caller's deadline; the request gets what is left of it.
        deadline = Deadline(timeout)
        return self.pool.send(data, lambda ref: self._infer(ref, top_k, deadline.left()), timeout=timeout)

    def async_infer(self, data: bytes, top_k: int, callback, timeout: float | None = None) -> None:
        """Send one image without blocking; ``callback(predictions, error)`` runs on a gRPC thread when the
        response arrives (or on this thread, if it already has). Raises what fails before it is sent."""
        deadline = Deadline(timeout)
        region, payload = self.pool.acquire(data, timeout) if self.pool is not None else (None, data)
        timeout = deadline.left()
        try:
            future = self._model_infer.future(infer_request(self.model, payload, top_k, timeout=timeout), timeout=timeout)
        except Exception as exc:
            error = map_error(exc)
            if region is not None:
                self.pool.release(region, error)
            raise error from exc

        def done(call) -> None:
            try:
                preds = predictions(call.result())
            except Exception as exc:  # noqa: BLE001 - the RPC's error, or a malformed response
                error = map_error(exc)
                if region is not None:
                    self.pool.release(region, error)
                callback(None, error)
                return
            if region is not None:
                self.pool.release(region)
            callback(preds, None)

        future.add_done_callback(done)

    def open_stream(self, requests, timeout: float | None = None):
        """Start ``ModelStreamInfer`` fed by the iterator ``requests``; returns the call (iterate it for
        responses; ``.cancel()`` it to end)."""
        return self._stub.ModelStreamInfer(requests, timeout=timeout)

    # -- health and statistics -------------------------------------------------------------------------

    def is_ready(self, timeout: float | None = 2.0) -> bool:
        try:
            return (self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout).ready
                    and self._stub.ModelReady(service_pb2.ModelReadyRequest(name=self.model), timeout=timeout).ready)
        except Exception:  # noqa: BLE001 - unreachable means not ready
            return False

    def statistics(self, timeout: float | None = None) -> dict:
        """Triton's statistics of every model (``ModelStatisticsResponse`` as JSON), from the server this
        channel reaches."""
        return _json(_call(self._stub.ModelStatistics, service_pb2.ModelStatisticsRequest(name=""), timeout))

    def statistics_by_server(self, timeout: float | None = None) -> dict[str, dict | TritonVisionError]:
        """:meth:`statistics` of every server the calls may reach (see :meth:`Connection.servers`), asked
        at once, by address; a server that did not answer maps to its error."""
        servers = _servers(self.connection)
        if servers == [self.connection]:
            return {self.url: self.statistics(timeout)}
        channels = [open_channel(conn) for conn in servers]
        try:
            request = service_pb2.ModelStatisticsRequest(name="")
            calls = [service_pb2_grpc.GRPCInferenceServiceStub(c).ModelStatistics.future(request, timeout=timeout)
                     for c in channels]
            out: dict[str, dict | TritonVisionError] = {}
            for conn, call in zip(servers, calls):
                try:
                    out[conn.target] = _json(call.result())
                except Exception as exc:  # noqa: BLE001 - one server's failure is reported, not raised
                    out[conn.target] = map_error(exc)
            return out
        finally:
            for c in channels:
                c.close()

    # -- shared memory ---------------------------------------------------------------------------------
    def registered_shm(self, kind: str = "system") -> list[str]:
        """Names of the regions the server has registered (of every client)."""
        return self.shm_calls.registered_shm(kind)

    def close(self) -> None:
        """Unregister and free the pool's regions, then close the channel (idempotent)."""
        try:
            if self.pool is not None:
                self.pool.close()
        finally:
            self._channel.close()


class AsyncGrpcTransport:
    """The asyncio twin of :class:`GrpcTransport` on a ``grpc.aio`` channel. With ``shm``, its pool
    registers regions through a blocking :class:`GrpcTransport` of its own (see :mod:`._shm`)."""

    def __init__(self, url: str | Connection, *, model: str = ENSEMBLE, ssl: bool = False, shm: str | None = None,
                 device_id: int = 0):
        self.connection = _connection(url, ssl)
        self.url = self.connection.target
        self.model = model
        self._registrar = GrpcTransport(self.connection, model=model, shm=shm, device_id=device_id) if shm else None
        self.pool: ShmPool | None = self._registrar.pool if self._registrar is not None else None
        # A grpc.aio channel belongs to the event loop it was opened in: one is opened in each loop that uses
        # the transport (a client made at import time, then used under the application's loop, one
        # asyncio.run() after another, or one loop per thread) and kept while that loop lives.
        self._channels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        """A call's metadata, made as it starts: the headers, and the current trace context with ``trace``
        (see open_channel)."""
        return self.connection.metadata() or None

    @property
    def _stub(self) -> service_pb2_grpc.GRPCInferenceServiceStub:
        if self._closed:
            raise TritonVisionError(f"the client of {self.url} is closed")
        loop = asyncio.get_running_loop()
        opened = self._channels.get(loop)
        if opened is None:
            with self._lock:
                # Channels of loops that have ended cannot be closed any more: they go with their loops.
                for old in [old for old in self._channels if old.is_closed()]:
                    del self._channels[old]
                channel = open_channel(self.connection, aio=True)
                opened = self._channels[loop] = (channel, service_pb2_grpc.GRPCInferenceServiceStub(channel))
        return opened[1]

    async def _infer(self, payload: Payload, top_k: int, timeout: float | None) -> list[Prediction]:
        try:
            return predictions(
                await self._stub.ModelInfer(infer_request(self.model, payload, top_k, timeout=timeout), timeout=timeout,
                                            metadata=self._metadata)
            )
        except Exception as exc:
            raise map_error(exc) from exc

    async def infer(self, data: bytes, top_k: int, timeout: float | None = None) -> list[Prediction]:
        if self.pool is None:
            return await self._infer(data, top_k, timeout)
        deadline = Deadline(timeout)
        return await self.pool.asend(data, lambda ref: self._infer(ref, top_k, deadline.left()), timeout=timeout)

    def open_stream(self, timeout: float | None = None):
        """Start ``ModelStreamInfer``; ``await call.write(request)``, iterate the call for responses,
        ``await call.done_writing()`` to half-close, ``call.cancel()`` to end."""
        return self._stub.ModelStreamInfer(timeout=timeout, metadata=self._metadata)

    async def is_ready(self, timeout: float | None = 2.0) -> bool:
        try:
            server = await self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout, metadata=self._metadata)
            model = await self._stub.ModelReady(service_pb2.ModelReadyRequest(name=self.model), timeout=timeout,
                                                metadata=self._metadata)
            return server.ready and model.ready
        except Exception:  # noqa: BLE001 - unreachable means not ready
            return False

    async def statistics(self, timeout: float | None = None) -> dict:
        try:
            return _json(await self._stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name=""), timeout=timeout,
                                                          metadata=self._metadata))
        except Exception as exc:
            raise map_error(exc) from exc

    async def statistics_by_server(self, timeout: float | None = None) -> dict[str, dict | TritonVisionError]:
        """See :meth:`GrpcTransport.statistics_by_server`."""
        servers = await asyncio.to_thread(_servers, self.connection)  # name resolution blocks
        if servers == [self.connection]:
            return {self.url: await self.statistics(timeout)}
        channels = [open_channel(conn, aio=True) for conn in servers]
        try:
            request = service_pb2.ModelStatisticsRequest(name="")
            answers = await asyncio.gather(
                *(service_pb2_grpc.GRPCInferenceServiceStub(c).ModelStatistics(request, timeout=timeout,
                                                                               metadata=self._metadata)
                  for c in channels),
                return_exceptions=True)
        finally:
            await asyncio.gather(*(c.close() for c in channels))
        return {conn.target: map_error(a) if isinstance(a, BaseException) else _json(a)
                for conn, a in zip(servers, answers)}

    async def close(self) -> None:
        try:
            self._closed = True
            with self._lock:
                channels, self._channels = list(self._channels.items()), weakref.WeakKeyDictionary()
            here = asyncio.get_running_loop()
            elsewhere = []
            for loop, (channel, _) in channels:
                if loop is here:
                    await channel.close()
                elif loop.is_running():  # another thread's loop: closed there, its calls failing as cancelled
                    elsewhere.append(asyncio.wrap_future(asyncio.run_coroutine_threadsafe(channel.close(), loop)))
            if elsewhere:
                await asyncio.gather(*elsewhere, return_exceptions=True)
        finally:
            if self._registrar is not None:
                # Unregistering waits for regions a cancelled request may still read: not on the event loop.
                await asyncio.to_thread(self._registrar.close)
