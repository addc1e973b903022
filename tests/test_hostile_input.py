"""Hostile input: images that are cheap to send and costly to decode, probes that fish for bytes, and
pixels a client sends straight to the inner model."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

import tritonvision as tv
from tritonvision import spec
from tritonvision_server.imagecheck import InvalidImage, inspect

from conftest import encode


def _png(width: int, height: int) -> bytes:
    return encode(np.zeros((height, width), np.uint8), "PNG")


@pytest.mark.parametrize("size", [(16384, 1), (16384, 8), (1, 16384), (4000, 10)])
def test_extreme_aspect_ratios_are_refused_by_the_header_check(size):
    # 16384x1 is 133 bytes; resizing its short side to 256 pixels made a 4-gigapixel image.
    with pytest.raises(InvalidImage, match="aspect ratio"):
        inspect(_png(*size))


def test_panoramas_within_the_aspect_ratio_limit_pass():
    ratio = int(spec.IMAGE_LIMITS.max_aspect_ratio)
    assert inspect(_png(ratio * 16, 16)).width == ratio * 16


def test_extreme_aspect_ratio_fails_only_its_own_request_and_fast(classifier, photos):
    sliver = _png(16384, 1)
    started = time.monotonic()
    results = classifier.classify_batch([photos["coffee"], sliver, _png(16384, 8)], return_exceptions=True)
    assert time.monotonic() - started < 10
    assert isinstance(results[0], list)
    for refused in results[1:]:
        assert isinstance(refused, tv.InvalidImageError) and "aspect ratio" in refused.message


def test_refusals_do_not_echo_the_request_bytes(classifier):
    secret = b"SECRET-TOKEN-0123456789" * 4
    with pytest.raises(tv.InvalidImageError) as info:
        classifier.classify(secret)
    message = info.value.message
    assert "SECRET" not in message and secret[:8].hex() not in message and "first bytes" not in message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e38, -3e38])
def test_resnet50_called_directly_refuses_non_finite_pixels_and_pixels_that_overflow(grpc_url, bad):
    # Finite values near the float limit overflow inside the network: NaN scores came back with OK.
    pixels = np.zeros((1, *spec.CPU.pixels.dims), np.float32)
    if np.isfinite(bad):
        pixels[:] = bad
    else:
        pixels[0, 1, 100, 100] = bad
    tensor = grpcclient.InferInput(spec.CPU.pixels.name, list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    with grpcclient.InferenceServerClient(grpc_url) as client:
        with pytest.raises(InferenceServerException) as info:
            client.infer(spec.RESNET50, [tensor])
        assert "StatusCode.INVALID_ARGUMENT" in str(info.value.status())
        # Finite pixels still go through, and the model keeps serving.
        tensor.set_data_from_numpy(np.zeros_like(pixels))
        assert client.infer(spec.RESNET50, [tensor]).as_numpy(spec.SCORES.name).shape == (1, spec.NUM_CLASSES)


def test_a_valid_image_of_a_kind_the_decoder_does_not_take_is_not_called_corrupt(classifier, photos):
    import io

    from PIL import Image

    # A 32-bit integer greyscale TIFF: a valid file that passes the header check and that DALI cannot decode.
    buf = io.BytesIO()
    Image.fromarray(np.arange(40 * 60, dtype=np.int32).reshape(40, 60) * 1000).save(buf, "TIFF")
    results = classifier.classify_batch([photos["coffee"], buf.getvalue()], return_exceptions=True)
    assert not isinstance(results[0], tv.TritonVisionError)
    assert isinstance(results[1], tv.InvalidImageError)
    assert "could not decode the TIFF image" in results[1].message
    assert "of a kind of TIFF the decoder does not support" in results[1].message


def _status_kib(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as fh:
        return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in fh) if v.strip().endswith("kB")}


@pytest.fixture(scope="module")
def own_server(cpu_repository):
    """A server of its own: an oversized request grows a python-backend region for good."""
    from tritonvision_server.launcher import TritonServer

    with TritonServer(cpu_repository) as server:
        yield server


def test_oversized_requests_fail_alone_and_their_copies_do_not_pile_up(own_server, photos):
    """Triton's gRPC port takes up to 2 GiB, so the header check refuses an upload over the limit only after
    the server has copied it (README, Hostile input). Those copies must not accumulate: with Triton's default
    pool of 8 reusable request objects each kept the capacity of the largest request it held (3 uploads of
    65 MiB: +244 MiB and growing); the launcher turns the pool off. What stays is the stub's region, grown
    to hold the request (the python backend never shrinks one)."""
    image = np.frombuffer(photos["coffee"], np.uint8)
    oversized = np.zeros(spec.IMAGE_LIMITS.max_bytes + 2**20, np.uint8)
    oversized[: image.size] = image
    with grpcclient.InferenceServerClient(own_server.grpc_url) as client:
        def infer(data):
            tensor = grpcclient.InferInput(spec.IMAGE.name, [1, data.size], "UINT8")
            tensor.set_data_from_numpy(data.reshape(1, -1))
            return client.infer(spec.ENSEMBLE, [tensor])

        for _ in range(5):
            infer(image)
        anon_before = _status_kib(own_server.pid)["RssAnon"]
        for _ in range(3):
            with pytest.raises(InferenceServerException) as info:
                infer(oversized)
            assert "StatusCode.INVALID_ARGUMENT" in str(info.value.status())
            assert "exceeds the limit" in info.value.message()
            # Each fails alone: the server still serves.
            assert infer(image).as_numpy(spec.SCORES.name).size
        grown = (_status_kib(own_server.pid)["RssAnon"] - anon_before) * 1024
        # glibc keeps some of a copy's pages in its heaps (fragments), at most about one request's worth.
        assert grown <= 1.5 * oversized.size, f"tritonserver holds {grown >> 20} MiB more after 3 x {oversized.size >> 20} MiB"


def test_a_request_of_many_large_images_is_decoded_within_the_run_budget(own_server):
    """Limits are per image, so one small request can carry 32 images just under them. DALI keeps the buffers
    of the largest run it decoded, so preprocess decodes a batch in runs of at most
    ``spec.IMAGE_LIMITS.max_run_pixels`` (README, Hostile input): 32 rows of 30 MP (15 MB of JPEG) took
    ~2.9 GB of the stub's memory for good when decoded as one run, and take one run's worth now."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (5477, 5477), (120, 80, 200)).save(buf, "JPEG", quality=10)  # 30 MP, 0.47 MB
    image = np.frombuffer(buf.getvalue(), np.uint8)
    (stub,) = [pid for pid, cmd in own_server.stub_processes().items() if f"/{spec.PREPROCESS}/1/model.py" in cmd]
    with grpcclient.InferenceServerClient(own_server.grpc_url) as client:
        def infer(rows):
            data = np.tile(image, (rows, 1))
            tensor = grpcclient.InferInput(spec.IMAGE.name, list(data.shape), "UINT8")
            tensor.set_data_from_numpy(data)
            return client.infer(spec.ENSEMBLE, [tensor], client_timeout=120).as_numpy(spec.SCORES.name)

        one = infer(1)
        before = _status_kib(stub)["VmHWM"]
        scores = infer(32)
        grown = (_status_kib(stub)["VmHWM"] - before) * 1024
    print(f"preprocess stub peak: +{grown >> 20} MiB for 32 x 30 MP")
    assert scores.shape == (32, spec.NUM_CLASSES)
    np.testing.assert_allclose(scores, np.repeat(one, 32, axis=0), atol=1e-6)
    run_bytes = 3 * spec.IMAGE_LIMITS.max_run_pixels  # one run's decoded RGB pixels (measured: ~1.5x of it)
    assert grown <= 3 * run_bytes, f"the preprocess stub's peak grew by {grown >> 20} MiB for 32 x 30 MP"


def _length_bombs() -> dict[str, bytes]:
    """Small files with one chunk declaring 1 GiB: a PNG's eXIf chunk, a WebP's EXIF chunk."""
    import struct
    import zlib

    from image_helpers import orientation_exif

    pixels = np.random.default_rng(0).integers(0, 256, (36, 52, 3), dtype=np.uint8)
    png = encode(pixels, "PNG")
    at = png.find(b"IDAT") - 4
    body = b"MM\0*\0\0\0\x08"
    chunk = struct.pack(">I", 1 << 30) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    webp = bytearray(encode(pixels, "WEBP", quality=80, exif=orientation_exif(6)))
    exif = webp.find(b"EXIF")
    webp[exif + 4 : exif + 8] = struct.pack("<I", 1 << 30)
    return {"png": png[:at] + chunk + png[at:], "webp": bytes(webp)}


def test_chunk_length_bombs_are_refused_by_the_header_check_alone_without_the_decoder_allocating(
        classifier, photos, triton_server):
    # A few hundred bytes whose chunk declares 1 GiB: DALI 2.4's PNG and WebP parsers allocated the declared
    # size (up to 4 GiB, 20 s, for a WebP) before finding the data missing.
    (stub,) = [pid for pid, cmd in triton_server.stub_processes().items() if f"/{spec.PREPROCESS}/1/model.py" in cmd]
    bombs = _length_bombs()
    reference = classifier.classify(photos["coffee"])
    before = _status_kib(stub)["VmHWM"]
    results = classifier.classify_batch([photos["coffee"], bombs["png"], bombs["webp"], photos["coffee"]],
                                        return_exceptions=True)
    grown_mib = (_status_kib(stub)["VmHWM"] - before) >> 10
    assert [p.label for p in results[0]] == [p.label for p in reference] == [p.label for p in results[3]]
    for fmt, refused in zip(bombs, results[1:3]):
        assert isinstance(refused, tv.InvalidImageError), f"{fmt}: {refused!r}"
        assert "image refused (header)" in refused.message and "runs past the end of the file" in refused.message
    assert grown_mib < 256, f"the preprocess stub's peak grew by {grown_mib} MiB"
