"""The cpu profile end to end: the real Triton server, the ensemble, the SDK, over gRPC."""

from __future__ import annotations

import io
import struct
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from image_helpers import encode, orientation_exif, undecodable_jpeg
from sdk_helpers import classify_in_threads
from reference import reference_scores, top_k
from tritonvision import Classifier, InvalidImageError, spec
from tritonvision_server.launcher import ServerStartError, TritonServer


# Classes whose reference scores are this close are tied: the two pipelines may rank them either way.
TIE = 2e-4


def _check_against_reference(predictions, onnx_path, data, *, tol=1e-3):
    """Same top-k as the in-process reference (up to ties), each score within ``tol``."""
    ref = reference_scores(onnx_path, data)
    expected = top_k(ref, len(predictions))
    got = [p.index for p in predictions]
    for rank, (g, e) in enumerate(zip(got, expected)):
        assert g == e or abs(ref[g] - ref[e]) <= TIE, f"rank {rank}: got class {g}, reference {e}; top-k {got} vs {expected}"
    for p in predictions:
        assert abs(p.score - float(ref[p.index])) <= tol, (p, float(ref[p.index]))


def _delta(classifier, before, model: str):
    """What ``model`` did since the ``before`` snapshot, once Triton has recorded all of it."""
    return classifier.settled_statistics().models[model] - before.models[model]


def test_classify_returns_same_top5_as_reference_pipeline(classifier, photos, onnx_path):
    tops = set()
    for name, data in photos.items():
        predictions = classifier.classify(data, top_k=5)
        assert len(predictions) == 5
        assert all(p.label == configs_label(p.index) for p in predictions)
        _check_against_reference(predictions, onnx_path, data)
        tops.add(tuple(p.index for p in predictions))
    # The random-weight model must still tell the photos apart, or the comparison above proves little.
    assert len(tops) > 1


def configs_label(index: int) -> str:
    from tritonvision_server.configs import labels

    return labels()[index]


def test_paths_and_file_objects_classify_like_bytes(classifier, photos, tmp_path):
    data = photos["coffee"]
    path = tmp_path / "coffee.jpg"
    path.write_bytes(data)
    expected = classifier.classify(data)
    assert classifier.classify(path) == expected
    assert classifier.classify(str(path)) == expected
    with open(path, "rb") as fh:
        assert classifier.classify(fh) == expected


def test_batch_of_n_gives_same_results_as_n_single_requests(classifier, photos):
    images = list(photos.values()) * 2
    singles = [classifier.classify(img) for img in images]
    batched = classifier.classify_batch(images)
    for single, batch in zip(singles, batched):
        assert [p.index for p in single] == [p.index for p in batch]
        assert np.allclose([p.score for p in single], [p.score for p in batch], atol=1e-5)


def test_one_request_carrying_several_images_returns_one_result_each(grpc_url, classifier, photos):
    # A client may pad several encoded images into one [n, max_len] request; decoders ignore the padding.
    blobs = [photos["chelsea"], photos["astronaut"]]
    width = max(map(len, blobs))
    tensor = np.zeros((len(blobs), width), np.uint8)
    for row, blob in zip(tensor, blobs):
        row[: len(blob)] = np.frombuffer(blob, np.uint8)
    client = grpcclient.InferenceServerClient(grpc_url)
    inp = grpcclient.InferInput(spec.IMAGE.name, list(tensor.shape), "UINT8")
    inp.set_data_from_numpy(tensor)
    result = client.infer(spec.ENSEMBLE, [inp], outputs=[grpcclient.InferRequestedOutput(spec.SCORES.name)])
    client.close()
    scores = result.as_numpy(spec.SCORES.name)
    assert scores.shape == (2, spec.NUM_CLASSES)
    for row, blob in zip(scores, blobs):
        assert top_k(row) == [p.index for p in classifier.classify(blob)]


def test_server_batches_concurrent_requests(classifier, photos):
    before = classifier.settled_statistics()
    classifier.classify_batch(list(photos.values()) * 4)
    delta = _delta(classifier, before, spec.RESNET50)
    multi = {b: c.count for b, c in delta.batches.items() if b > 1}
    assert sum(multi.values()) > 0, f"no execution with batch size > 1: {delta.batches}"
    assert delta.inference_count == 16 and delta.execution_count < delta.inference_count


def _huge_header_jpeg(data: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its frame header claiming ``width x height``."""
    i = 2
    while True:
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if 0xC0 <= marker <= 0xC3:
            return data[: i + 5] + struct.pack(">HH", height, width) + data[i + 9 :]
        i += 2 + length


def _bad_inputs(photos) -> dict[str, tuple[bytes, str]]:
    good = photos["chelsea"]
    rng = np.random.default_rng(7)
    return {
        "empty": (b"", "empty image"),
        "truncated_jpeg": (good[: len(good) // 2], "truncated JPEG"),
        # Passes the header check, fails in DALI: exercises the request-by-request retry of the batch.
        "undecodable_jpeg": (undecodable_jpeg(good), "could not decode the JPEG image"),
        "random_bytes": (rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes(), "not a supported image"),
        "text_file": (b"name,score\ncat,0.9\n" * 50, "not a supported image"),
        "huge_header": (_huge_header_jpeg(good, 30_000, 30_000), "exceeds the limit"),
        "too_wide": (encode(np.zeros((8, 20_000), np.uint8)), "exceeds the limit"),
        "gif": (encode(np.zeros((64, 64), np.uint8), "GIF"), "not a supported image"),
    }


BAD_CASES = ["empty", "truncated_jpeg", "undecodable_jpeg", "random_bytes", "text_file", "huge_header", "too_wide", "gif"]


def test_bad_input_cases_are_all_exercised(photos):
    assert sorted(_bad_inputs(photos)) == sorted(BAD_CASES)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_fails_only_its_own_request(case, classifier, photos, onnx_path):
    bad, message = _bad_inputs(photos)[case]
    good = [photos["astronaut"], photos["coffee"], photos["rocket"]]
    images = [good[0], bad, good[1], good[2], bad, good[0]]
    before = classifier.settled_statistics()
    results = classifier.classify_batch(images, return_exceptions=True)
    for image, result in zip(images, results):
        if image is bad:
            assert isinstance(result, InvalidImageError), result
            assert message in result.message, result.message
            assert result.status == "INVALID_ARGUMENT"
        else:
            assert isinstance(result, list), result
            _check_against_reference(result, onnx_path, image)
    # Some of them shared a preprocess batch with the bad image's requests.
    assert _delta(classifier, before, spec.PREPROCESS).execution_count < len(images)
    assert classifier.is_ready()


def test_undecodable_jpeg_among_concurrent_requests_fails_alone(classifier, photos):
    good = photos["chelsea"]
    bad = undecodable_jpeg(good)
    outcomes = classify_in_threads(classifier, [good, bad, good, good, bad, good])
    errors = [i for i, o in outcomes.items() if isinstance(o, InvalidImageError)]
    assert sorted(errors) == [1, 4]
    assert all("could not decode" in outcomes[i].message for i in errors)
    expected = [p.index for p in outcomes[0]]
    assert all([p.index for p in outcomes[i]] == expected for i in (2, 3, 5))


def _format(photo: bytes, fmt: str, **kwargs) -> bytes:
    from PIL import Image

    image = Image.open(io.BytesIO(photo))
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_and_webp_formats_classify_like_the_reference(fmt, classifier, photos, onnx_path):
    data = _format(photos["chelsea"], fmt)
    _check_against_reference(classifier.classify(data), onnx_path, data)


def test_greyscale_and_cmyk_jpegs_classify_like_the_reference(classifier, photos, onnx_path):
    from PIL import Image

    image = Image.open(io.BytesIO(photos["astronaut"]))
    for mode in ("L", "CMYK"):
        buf = io.BytesIO()
        image.convert(mode).save(buf, format="JPEG", quality=92)
        _check_against_reference(classifier.classify(buf.getvalue()), onnx_path, buf.getvalue())


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_photo_classifies_like_the_upright_photo(orientation, classifier, photos, onnx_path):
    from PIL import Image

    upright = Image.open(io.BytesIO(photos["chelsea"]))
    # Store the pixels rotated and let the EXIF tag say how to turn them back, as cameras do.
    stored = upright.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation])
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=orientation_exif(orientation))
    rotated = classifier.classify(buf.getvalue())
    _check_against_reference(rotated, onnx_path, buf.getvalue())
    # Re-encoding adds JPEG noise, so compare with the upright photo on the well-separated top 3 only.
    upright_top = classifier.classify(photos["chelsea"], top_k=3)
    assert [p.index for p in rotated[:3]] == [p.index for p in upright_top]
    assert np.allclose([p.score for p in rotated[:3]], [p.score for p in upright_top], atol=2e-3)


def test_server_shuts_down_cleanly_without_leaving_shared_memory(cpu_repository, photos):
    server = TritonServer(cpu_repository)
    try:
        server.start()
        with Classifier(server.grpc_url, timeout=120) as clf:
            results = clf.classify_batch([photos["coffee"], b"junk", photos["chelsea"][:5000]], return_exceptions=True)
        assert isinstance(results[0], list)
        assert server.leftover_shm(), "the python backend should be using shared memory while serving"
    finally:
        code = server.stop()
    # What the server itself left: the wrapper removes it afterwards, so ask the wrapper what it had to clean.
    assert server.cleaned_shm == [], f"the server left shared memory behind (exit code {code}): {server.cleaned_shm}"
    assert code == 0 and not server.running
    assert server.leftover_shm() == []


def test_wrapper_removes_the_shared_memory_of_a_server_that_was_killed(tmp_path, photos):
    import os
    import signal

    from tritonvision_server.configs import write_light_repository

    server = TritonServer(write_light_repository(tmp_path / "light"), log_file=tmp_path / "tritonserver.log")
    try:
        server.start()
        with Classifier(server.grpc_url, timeout=60) as clf:
            assert clf.classify(photos["coffee"], top_k=1)
        os.killpg(server.pid, signal.SIGKILL)  # the server and its python-backend stubs, at once
        deadline = time.monotonic() + 30
        while server.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server.running
        # Before any cleanup by the wrapper: a killed server leaves its regions behind.
        left = server.leftover_shm()
        assert left, "a SIGKILLed python backend should have left its shared memory in /dev/shm"
    finally:
        code = server.stop()
    assert code == -signal.SIGKILL
    assert server.leftover_shm() == [], "the wrapper did not remove the shared memory of a server that died"
    assert sorted(server.cleaned_shm) == left


def _running_in_group(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that still run (zombies, dead but not yet reaped, excluded)."""
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # state, ppid, pgrp
            found.append(int(stat.parent.name))
    return found


def test_stop_kills_a_server_that_outlasts_its_timeout_with_its_whole_process_group(tmp_path):
    import signal

    from tritonvision_server.configs import write_light_repository

    server = TritonServer(write_light_repository(tmp_path / "light"), log_file=tmp_path / "tritonserver.log")
    try:
        server.start()
        pid = server.pid
        assert server.leftover_shm()
    finally:
        # Triton polls its shutdown once a second: it never exits within 0.2 s of SIGTERM.
        code = server.stop(timeout=0.2)
    assert code == -signal.SIGKILL, f"stop(timeout=0.2) should have killed the server; exit code {code}"
    # The python-backend stubs are in the server's process group: none of them outlives the kill.
    deadline = time.monotonic() + 10
    while _running_in_group(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running_in_group(pid), "a process of the killed server's group (a python-backend stub) still runs"
    assert server.leftover_shm() == [], "the wrapper did not remove the shared memory of the server it killed"


def test_startup_failure_raises_with_the_server_log(tmp_path, cpu_repository):
    broken = tmp_path / "repo"
    (broken / "broken" / "1").mkdir(parents=True)
    (broken / "broken" / "config.pbtxt").write_text('name: "broken"\nbackend: "no_such_backend"\n')
    server = TritonServer(broken, startup_timeout=60)
    with pytest.raises(ServerStartError) as info:
        server.start()
    assert "no_such_backend" in str(info.value)
    assert not server.running and server.leftover_shm() == []


def test_serve_command_serves_until_sigint_then_exits_cleanly(cpu_repository, photos):
    from sdk_helpers import serve_classify_and_interrupt
    from tritonvision_server.launcher import SHM_DIR

    code, out, pid = serve_classify_and_interrupt(["--model-repository", str(cpu_repository)], photos["coffee"])
    assert code == 0, out
    assert "shutting down" in out
    assert not list(SHM_DIR.glob(f"tritonvision_{pid}_*"))
