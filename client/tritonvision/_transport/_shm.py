"""Shared-memory regions for image inputs: a pool of registered regions reused across requests.

Creating and registering a region costs two system calls and a round trip, so regions are kept and
reused; a region too small for an image is replaced by a larger one. Every region has a unique name
(``tritonvision_client_<pid>_<random>_<n>``, also its ``/dev/shm`` file name for system memory).

Nothing may leak: :meth:`ShmPool.close` unregisters every region from the server (ignoring a server that
is gone) and destroys it locally; a ``weakref.finalize`` runs the same at interpreter exit and when the
pool is garbage-collected unclosed. A region whose creation, write or registration fails is destroyed
on the spot.

The pool also owns the rule that a request through a region needs: :meth:`ShmPool.send` and
:meth:`ShmPool.asend` lease a region around one call and, when a restarted server has forgotten our
registrations, register again and call once more. Registration goes through a *registrar*, blocking calls
on a blocking channel (also for asyncio clients: registration is rare, and the pool's cleanup must work
without an event loop, at exit or from a finalizer).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from .._retry import Deadline
from ..extras import require
from ..exceptions import InvalidImageError, ModelNotReadyError, ServerUnavailableError, SharedMemoryError, TritonVisionError

log = logging.getLogger(__name__)
T = TypeVar("T")

KEY_PREFIX = "tritonvision_client_"
SHM_DIR = "/dev/shm"
MIN_REGION_BYTES = 1 << 20
KINDS = ("system", "cuda")


def _round_up(n: int) -> int:
    return max(MIN_REGION_BYTES, 1 << (max(n, 1) - 1).bit_length())


@dataclass(frozen=True)
class ShmInput:
    """An image already written to a registered shared-memory region."""

    region: str
    byte_size: int
    offset: int = 0


class Registrar(Protocol):
    """The server calls a pool makes (:class:`._grpc.ShmCalls`)."""

    def register_system_shm(self, name: str, key: str, byte_size: int, timeout: float | None = None) -> None: ...
    def register_cuda_shm(self, name: str, raw_handle: bytes, device_id: int, byte_size: int,
                          timeout: float | None = None) -> None: ...
    def unregister_shm(self, kind: str, name: str, timeout: float | None = 5.0) -> None: ...
    def registered_shm(self, kind: str = "system", timeout: float | None = None) -> list[str]: ...


@dataclass(eq=False)
class Region:
    name: str
    byte_size: int
    handle: Any
    registered: bool = False


class _System:
    kind = "system"

    def __init__(self) -> None:
        import tritonclient.utils.shared_memory as shm

        self.shm = shm

    def create(self, name: str, byte_size: int):
        # create_only: a name collision must fail, never map somebody else's region.
        return self.shm.create_shared_memory_region(name, "/" + name, byte_size, create_only=True)

    def write(self, handle, data: bytes) -> None:
        self.shm.set_shared_memory_region(handle, [np.frombuffer(data, dtype=np.uint8)])

    def register(self, registrar: Registrar, region: Region, timeout: float | None = None) -> None:
        registrar.register_system_shm(region.name, "/" + region.name, region.byte_size, timeout)

    def destroy(self, handle) -> None:
        self.shm.destroy_shared_memory_region(handle)


class _Cuda:
    kind = "cuda"

    def __init__(self, device_id: int) -> None:
        try:
            import tritonclient.utils.cuda_shared_memory as cudashm
        except (ImportError, RuntimeError) as exc:  # tritonclient raises RuntimeError without cuda-python
            require("cuda.bindings.runtime", extra="cuda", what="CUDA shared memory")
            raise SharedMemoryError(f"CUDA shared memory is unavailable: {exc}") from exc
        self.cudashm = cudashm
        self.device_id = device_id

    def create(self, name: str, byte_size: int):
        return self.cudashm.create_shared_memory_region(name, byte_size, self.device_id)

    def write(self, handle, data: bytes) -> None:
        self.cudashm.set_shared_memory_region(handle, [np.frombuffer(data, dtype=np.uint8)])

    def register(self, registrar: Registrar, region: Region, timeout: float | None = None) -> None:
        raw = self.cudashm.get_raw_handle(region.handle)
        registrar.register_cuda_shm(region.name, raw, self.device_id, region.byte_size, timeout)

    def destroy(self, handle) -> None:
        self.cudashm.destroy_shared_memory_region(handle)


@dataclass
class _State:
    """What the finalizer needs; it must not hold the pool itself."""

    registrar: Registrar
    backend: Any
    # The process that made the regions: a forked child inherits the pool (and its finalizer, run when the
    # child exits), but the regions and their registrations are the parent's, still in use there.
    pid: int = field(default_factory=os.getpid)
    regions: dict[str, Region] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


# How long closing waits for the server to finish with a region a cancelled request still reads.
IN_USE_WAIT = 10.0


def _unregister(state: _State, region: Region, deadline: Deadline | None = None) -> bool:
    """Unregister ``region``; False when the server did not (it is gone, restarted or not answering)."""
    waited, pause = 0.0, 0.02
    while True:
        try:
            state.registrar.unregister_shm(state.backend.kind, region.name, deadline.left(5.0) if deadline else 5.0)
            return True
        except TritonVisionError as exc:
            # Triton refuses to unregister a region a request is reading ("... it is currently in use"):
            # a cancelled request may still be in the server. Triton has no status code of its own for
            # this, hence the message. Anything else means the server is gone, and its registrations too.
            if "in use" not in exc.message or waited >= IN_USE_WAIT or (deadline is not None and deadline.expired()):
                log.debug("could not unregister %s: %s", region.name, exc)
                return False
        time.sleep(pause)
        waited += pause
        pause = min(pause * 2, 0.5)


def _destroy(state: _State, region: Region, *, unregister: bool = True, deadline: Deadline | None = None) -> None:
    if unregister and region.registered:
        _unregister(state, region, deadline)
        region.registered = False
    try:
        state.backend.destroy(region.handle)
    except Exception as exc:  # noqa: BLE001 - keep destroying the others
        log.warning("could not destroy shared memory region %s: %s", region.name, exc)
    state.regions.pop(region.name, None)


def _release_all(state: _State) -> None:
    if os.getpid() != state.pid:
        return
    answering = True
    with state.lock:
        for region in list(state.regions.values()):
            # A server that did not answer for one region will not for the next: waiting out a timeout per
            # region made closing take 5 s a region against a stopped server (64 in flight: over 5 minutes).
            if answering and region.registered:
                answering = _unregister(state, region)
            region.registered = False
            _destroy(state, region)


class ShmPool:
    """Registered input regions of one kind (``"system"`` or ``"cuda"``) for one server.

    Use :meth:`lease` (a context manager) around a request, or :meth:`acquire`/:meth:`release` where the
    request completes in a callback.
    """

    def __init__(self, registrar: Registrar, kind: str = "system", *, device_id: int = 0):
        if kind not in KINDS:
            raise ValueError(f"shared memory kind must be one of {KINDS}, not {kind!r}")
        backend = _System() if kind == "system" else _Cuda(device_id)
        self.kind = kind
        self.prefix = f"{KEY_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self._state = _State(registrar, backend)
        self._free: list[Region] = []
        self._count = 0
        self._finalizer = weakref.finalize(self, _release_all, self._state)

    @property
    def region_names(self) -> list[str]:
        return sorted(self._state.regions)

    def _create(self, byte_size: int) -> Region:
        state = self._state
        with state.lock:
            self._count += 1
            name = f"{self.prefix}{self._count}"
        try:
            handle = state.backend.create(name, byte_size)
        except Exception as exc:  # noqa: BLE001 - tritonclient raises its own untyped exceptions here
            raise SharedMemoryError(f"cannot create {self.kind} shared memory region {name}: {exc}") from exc
        region = Region(name, byte_size, handle)
        with state.lock:
            state.regions[name] = region
        return region

    def _register(self, region: Region, deadline: Deadline) -> None:
        if region.registered:
            return
        try:
            # A region the server lost (it restarted) may still be registered under our name elsewhere:
            # nothing else uses our unique names, so unregistering first is safe and makes this idempotent.
            self._state.registrar.unregister_shm(self.kind, region.name, deadline.left(at_most=5.0))
        except TritonVisionError:
            pass
        self._state.backend.register(self._state.registrar, region, deadline.left())
        region.registered = True

    def acquire(self, data: bytes, timeout: float | None = None) -> tuple[Region, ShmInput]:
        """A registered region holding ``data``; give it back with :meth:`release`. Registering it is a call
        to the server, bounded by ``timeout`` (the caller's deadline): DeadlineExceededError past it."""
        deadline = Deadline(timeout)
        if not self._finalizer.alive:
            raise SharedMemoryError("the shared-memory pool is closed")
        with self._state.lock:
            region = next((r for r in self._free if r.byte_size >= len(data)), None)
            if region is None and self._free:
                region = self._free[0]  # too small: replaced below by a larger one
            if region is not None:
                self._free.remove(region)
        try:
            if region is not None and region.byte_size < len(data):
                _destroy(self._state, region, deadline=deadline)
                region = None
            if region is None:
                region = self._create(_round_up(len(data)))
            try:
                self._state.backend.write(region.handle, data)
            except Exception as exc:  # noqa: BLE001
                raise SharedMemoryError(f"cannot write shared memory region {region.name}: {exc}") from exc
            self._register(region, deadline)
        except BaseException:
            if region is not None:
                _destroy(self._state, region, deadline=deadline)
            raise
        return region, ShmInput(region.name, len(data))

    def release(self, region: Region, error: BaseException | None = None) -> None:
        """Return ``region`` to the pool. After :class:`ServerUnavailableError` it is re-registered on next use,
        as a restarted server has forgotten it."""
        if isinstance(error, ServerUnavailableError):
            region.registered = False
        with self._state.lock:
            owned = region.name in self._state.regions
            if owned and self._finalizer.alive:
                self._free.append(region)
                return
        if owned:  # the pool was closed while this request was in flight
            _destroy(self._state, region)

    def retire(self, region: Region) -> None:
        """Never hand out ``region`` again, but keep it until the pool closes: a cancelled request's region
        may still be read by the server, which also refuses to unregister a region in use."""
        with self._state.lock:
            owned = region.name in self._state.regions
        if owned and not self._finalizer.alive:
            _destroy(self._state, region)

    def forget_registrations(self) -> None:
        """Mark every region as unknown to the server (re-registered on next use)."""
        for region in list(self._state.regions.values()):
            region.registered = False

    def forgotten_by_server(self, timeout: float | None = None) -> bool:
        """Whether the server no longer knows regions this pool registered (it restarted between two
        calls, which then fail with NOT_FOUND for an unknown region). If so, every region is marked
        unknown, to be registered again on next use."""
        known = set(self._state.registrar.registered_shm(self._state.backend.kind, timeout))
        with self._state.lock:
            lost = [r for r in self._state.regions.values() if r.registered and r.name not in known]
        if lost:
            self.forget_registrations()
        return bool(lost)

    @contextmanager
    def lease(self, data: bytes, timeout: float | None = None) -> Iterator[ShmInput]:
        region, ref = self.acquire(data, timeout)
        try:
            yield ref
        except Exception as exc:
            self.release(region, exc)
            raise
        except BaseException:
            # Interrupted (Ctrl-C) while the request may still be in the server, reading the region.
            self.retire(region)
            raise
        self.release(region)

    def send(self, data: bytes, call: Callable[[ShmInput], T], timeout: float | None = None) -> T:
        """``call(ref)`` with ``data`` in a leased region, the pool's calls to the server bounded by ``timeout``.
        A server restarted since our regions were registered answers NOT_FOUND/INVALID_ARGUMENT for them:
        then register again and call once more."""
        deadline = Deadline(timeout)
        for last in (False, True):
            with self.lease(data, deadline.left()) as ref:
                try:
                    return call(ref)
                except (InvalidImageError, ModelNotReadyError):
                    if last or not self.forgotten_by_server(deadline.left()):
                        raise
            log.info("the server lost its shared-memory registrations; registering again")
        raise AssertionError("unreachable")

    async def asend(self, data: bytes, call: Callable[[ShmInput], Awaitable[T]], timeout: float | None = None) -> T:
        """:meth:`send` for a coroutine ``call``; the pool's blocking work runs in a worker thread."""
        deadline = Deadline(timeout)
        for last in (False, True):
            region, ref = await asyncio.to_thread(self.acquire, data, deadline.left())
            try:
                result = await call(ref)
            except asyncio.CancelledError:
                # The request may still be in the server, reading the region: never hand it out again.
                self.retire(region)
                raise
            except (InvalidImageError, ModelNotReadyError) as exc:
                self.release(region, exc)
                if last or not await asyncio.to_thread(self.forgotten_by_server, deadline.left()):
                    raise
                log.info("the server lost its shared-memory registrations; registering again")
                continue
            except BaseException as exc:
                self.release(region, exc)
                raise
            self.release(region)
            return result
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Unregister and destroy every region (idempotent)."""
        self._free.clear()
        self._finalizer()

    def __enter__(self) -> "ShmPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def leftover_files(prefix: str = KEY_PREFIX) -> list[str]:
    """``/dev/shm`` files whose name starts with ``prefix`` (for tests and diagnostics)."""
    try:
        return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(prefix))
    except FileNotFoundError:
        return []
