"""Error mapping (by status code only), retries with backoff, deadlines."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

import tritonvision as tv
from tritonvision._retry import Deadline, RetryPolicy, backoff_or_raise
from tritonvision._transport._errors import STATUS_TO_ERROR, map_error
from tritonvision_server.launcher import free_port


# What each gRPC status must become, and whether the client tries again, written out here rather than read
# from the code's table: only a server that cannot be reached is retried; overload, a bad image or a model
# that is not ready is an answer that a second try would only repeat (or make worse).
RETRIED, FINAL = True, False
EXPECTED: dict[str, tuple[type, bool]] = {
    "INVALID_ARGUMENT": (tv.InvalidImageError, FINAL),
    "OUT_OF_RANGE": (tv.InvalidImageError, FINAL),
    "UNAVAILABLE": (tv.ServerUnavailableError, RETRIED),
    "NOT_FOUND": (tv.ModelNotReadyError, FINAL),
    "FAILED_PRECONDITION": (tv.ModelNotReadyError, FINAL),
    "RESOURCE_EXHAUSTED": (tv.OverloadedError, FINAL),
    "DEADLINE_EXCEEDED": (tv.DeadlineExceededError, FINAL),
    "CANCELLED": (tv.InternalServerError, FINAL),
    "INTERNAL": (tv.InternalServerError, FINAL),
    "UNKNOWN": (tv.InternalServerError, FINAL),
    "UNIMPLEMENTED": (tv.InternalServerError, FINAL),
    "ABORTED": (tv.InternalServerError, FINAL),
    "ALREADY_EXISTS": (tv.InternalServerError, FINAL),
    "DATA_LOSS": (tv.InternalServerError, FINAL),
    "PERMISSION_DENIED": (tv.ServerError, FINAL),
    "UNAUTHENTICATED": (tv.ServerError, FINAL),
}


def test_the_expected_table_names_every_grpc_status():
    assert set(EXPECTED) == {c.name for c in grpc.StatusCode if c is not grpc.StatusCode.OK}
    assert set(STATUS_TO_ERROR) == {grpc.StatusCode[name] for name in EXPECTED}


class _RpcError(grpc.RpcError):
    """What grpc raises: an RpcError with code() and details()."""

    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "boom"


@pytest.mark.parametrize("source", ["tritonclient", "grpc"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_grpc_status_maps_to_its_sdk_error(name, source):
    code = grpc.StatusCode[name]
    raw = InferenceServerException("boom", status=str(code)) if source == "tritonclient" else _RpcError(code)
    error = map_error(raw)
    expected, _ = EXPECTED[name]
    assert type(error) is expected, f"{name} is mapped to {type(error).__name__}, expected {expected.__name__}"
    assert error.status == name and error.message == "boom"


def _attempts_sync(error) -> int:
    calls = 0

    def infer(data, top_k, timeout):
        nonlocal calls
        calls += 1
        raise error

    with tv.Classifier(f"127.0.0.1:{free_port()}", retry=RetryPolicy(attempts=3, initial=0.001, maximum=0.001)) as clf:
        clf._infer = infer
        with pytest.raises(type(error)):
            clf.classify(b"\xff\xd8\xff", timeout=10)
    return calls


def _attempts_async(error) -> int:
    calls = 0

    async def infer(data, top_k, timeout):
        nonlocal calls
        calls += 1
        raise error

    async def main():
        async with tv.AsyncClassifier(f"127.0.0.1:{free_port()}", retry=RetryPolicy(attempts=3, initial=0.001, maximum=0.001)) as clf:
            clf._infer = infer
            with pytest.raises(type(error)):
                await clf.classify(b"\xff\xd8\xff", timeout=10)

    asyncio.run(main())
    return calls


@pytest.mark.parametrize("client", ["sync", "async"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_grpc_status_is_retried_or_not_as_expected(name, client):
    error = map_error(InferenceServerException("boom", status=f"StatusCode.{name}"))
    attempts = (_attempts_sync if client == "sync" else _attempts_async)(error)
    _, retried = EXPECTED[name]
    want = 3 if retried else 1
    assert attempts == want, (f"{name} ({type(error).__name__}) was tried {attempts} times; "
                              f"expected {'retries' if retried else 'one try, no retry'}")


def test_mapping_ignores_message_text():
    misleading = "model is not ready: deadline exceeded, server unavailable"
    assert type(map_error(InferenceServerException(misleading, status="StatusCode.INVALID_ARGUMENT"))) is tv.InvalidImageError
    assert type(map_error(InferenceServerException("bad image", status="StatusCode.UNAVAILABLE"))) is tv.ServerUnavailableError


def test_error_without_status_is_the_base_error():
    error = map_error(InferenceServerException("client-side problem"))
    assert type(error) is tv.TritonVisionError and error.status is None


def test_backoff_grows_exponentially_with_bounded_jitter():
    policy = RetryPolicy(attempts=6, initial=0.1, maximum=1.0, multiplier=2.0, jitter=0.5)
    delays = list(policy.delays(random.Random(0)))
    assert len(delays) == 5
    for n, d in enumerate(delays):
        base = min(1.0, 0.1 * 2**n)
        assert base * 0.5 <= d <= base
    assert list(RetryPolicy(attempts=3, jitter=0.0, initial=0.1).delays()) == [0.1, 0.2]


def test_only_unavailable_is_retried():
    delays = RetryPolicy(attempts=3).delays()
    for error in (tv.InvalidImageError("x"), tv.OverloadedError("x"), tv.DeadlineExceededError("x"), tv.ModelNotReadyError("x")):
        with pytest.raises(type(error)):
            backoff_or_raise(error, delays, Deadline(None))
    assert backoff_or_raise(tv.ServerUnavailableError("x"), delays, Deadline(None)) > 0


def test_unreachable_server_is_retried_then_reported_unavailable():
    url = f"127.0.0.1:{free_port()}"
    policy = RetryPolicy(attempts=3, initial=0.05, maximum=0.1)
    with tv.Classifier(url, retry=policy) as clf:
        start = time.monotonic()
        with pytest.raises(tv.ServerUnavailableError):
            clf.classify(b"\xff\xd8\xff", timeout=20)
        assert time.monotonic() - start < 15


def test_deadline_spent_while_retrying_raises_deadline_exceeded():
    with tv.Classifier(f"127.0.0.1:{free_port()}", retry=RetryPolicy(attempts=100, initial=0.2, maximum=0.2)) as clf:
        start = time.monotonic()
        with pytest.raises(tv.DeadlineExceededError):
            clf.classify(b"\xff\xd8\xff", timeout=1.0)
        assert time.monotonic() - start < 3


def test_request_slower_than_its_deadline_raises_deadline_exceeded(classifier, photos):
    with pytest.raises(tv.DeadlineExceededError) as info:
        classifier.classify(photos["chelsea"], timeout=0.005)
    assert info.value.status == "DEADLINE_EXCEEDED"


def test_wait_until_ready_returns_for_a_ready_server_and_times_out_otherwise(grpc_url):
    with tv.Classifier(grpc_url) as clf:
        clf.wait_until_ready(timeout=10)
    with tv.Classifier(f"127.0.0.1:{free_port()}") as clf:
        with pytest.raises(tv.DeadlineExceededError):
            clf.wait_until_ready(timeout=0.5)


def test_unreadable_file_is_an_invalid_image(classifier, tmp_path):
    with pytest.raises(tv.InvalidImageError, match="cannot read"):
        classifier.classify(tmp_path / "missing.jpg")


def _closed_file(tmp_path):
    (tmp_path / "cat.jpg").write_bytes(b"\xff\xd8\xff")
    f = open(tmp_path / "cat.jpg", "rb")
    f.close()
    return f


def _pil(size):
    from PIL import Image

    return Image.new("L", size)


# Inputs refused on the client (made in tmp_path), each with a part of the message that names it.
CANNOT_ENCODE = {
    "path with a NUL byte": (lambda tmp: str(tmp / "a\0b.jpg"), r"a\x00b.jpg"),
    "closed file object": (_closed_file, "cat.jpg"),
    "file object not open for reading": (lambda tmp: open(tmp / "out.jpg", "wb"), "out.jpg"),
    "PIL image of 0x0 pixels": (lambda tmp: _pil((0, 0)), "0x0"),
    "PIL image wider than JPEG allows": (lambda tmp: _pil((70000, 1)), "70000x1"),
    "numpy image taller than JPEG allows": (lambda tmp: np.zeros((70000, 2), np.uint8), "2x70000"),
}


@pytest.mark.parametrize("call", ["classify", "submit", "async classify"])
@pytest.mark.parametrize("name", sorted(CANNOT_ENCODE))
def test_an_input_the_client_cannot_read_or_encode_is_an_invalid_image_naming_it(tmp_path, name, call):
    make, named = CANNOT_ENCODE[name]
    image = make(tmp_path)
    url = f"127.0.0.1:{free_port()}"  # nothing listens: the image must be refused before anything is sent
    try:
        error = _refusal(call, url, image)
    finally:
        getattr(image, "close", lambda: None)()
    assert error.status is None and error.reason is None
    assert named in error.message, error.message


def _refusal(call: str, url: str, image) -> tv.InvalidImageError:
    if call == "async classify":
        async def main():
            async with tv.AsyncClassifier(url, retry=RetryPolicy(attempts=1)) as clf:
                await clf.classify(image)

        with pytest.raises(tv.InvalidImageError) as info:
            asyncio.run(main())
    else:
        with tv.Classifier(url, retry=RetryPolicy(attempts=1)) as clf, pytest.raises(tv.InvalidImageError) as info:
            if call == "submit":
                clf.submit(image).result(10)
            else:
                clf.classify(image)
    return info.value


def test_pixels_too_large_for_jpeg_are_refused_by_their_size_before_encoding():
    from tritonvision._images import encoded_bytes

    # 66000x66000 pixels viewed from one byte: encoding it (4 GiB of pixels) would take seconds and then fail.
    huge = np.broadcast_to(np.zeros(1, np.uint8), (66000, 66000))
    started = time.monotonic()
    for image in (huge, _pil((65501, 8))):
        with pytest.raises(tv.InvalidImageError, match="at most 65500 pixels a side"):
            encoded_bytes(image)
    assert time.monotonic() - started < 1.0
    assert encoded_bytes(np.zeros((1, 65500), np.uint8))[:3] == b"\xff\xd8\xff"  # the limit itself is encoded
