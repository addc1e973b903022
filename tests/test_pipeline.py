"""The DALI preprocessing pipeline: the gpu profile's serialisation, and the shared function against torchvision."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from image_helpers import jpeg, undecodable_jpeg
from tritonvision import spec


def _reference(data: bytes) -> np.ndarray:
    """torchvision's ImageNet evaluation transform, on the image as a viewer shows it (EXIF orientation applied)."""
    from PIL import Image, ImageOps
    from torchvision import transforms

    p = spec.PREPROCESSING
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    t = transforms.Compose([
        transforms.Resize(p.resize_shorter), transforms.CenterCrop(p.crop), transforms.ToTensor(),
        transforms.Normalize(p.mean, p.std),
    ])
    return t(image).numpy()


@pytest.mark.parametrize("pixels_dtype", ["FP32", "FP16"])
def test_cpu_pipeline_matches_torchvision_reference_within_one_grey_level(odd_photos, pixels_dtype):
    from tritonvision_server.pipeline import CpuPreprocessor

    names = sorted(odd_photos)
    pre = CpuPreprocessor(max_batch_size=len(names), num_threads=2, pixels_dtype=pixels_dtype)
    out = pre([np.frombuffer(odd_photos[n], np.uint8) for n in names])
    assert out.shape == (len(names), 3, 224, 224)
    assert out.dtype == (np.float16 if pixels_dtype == "FP16" else np.float32)
    diffs = {n: float(np.abs(out[i].astype(np.float32) - _reference(odd_photos[n])).max()) for i, n in enumerate(names)}
    worst = max(diffs, key=diffs.get)
    print(f"max abs diff vs torchvision ({pixels_dtype}): {diffs}")
    # One grey level of 255 after normalisation (test_dali_versions.TOLERANCE), plus FP16's rounding.
    tolerance = 1.0 / 255 / min(spec.PREPROCESSING.std) + (2e-3 if pixels_dtype == "FP16" else 1e-5)
    assert diffs[worst] <= tolerance, f"max abs diff per photo (tolerance {tolerance:.5f}): {diffs}"


def test_exif_rotation_is_applied_not_ignored(odd_photos):
    # Guards the test above: with the orientation ignored the rotated photo would differ by far more than 0.02.
    from PIL import Image

    from tritonvision_server.pipeline import CpuPreprocessor

    data = odd_photos["exif_rotated"]
    unrotated = jpeg(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    pre = CpuPreprocessor(max_batch_size=1, num_threads=1)
    out = pre([np.frombuffer(data, np.uint8)])[0]
    assert np.abs(out - _reference(unrotated)).max() > 0.5


def test_generated_dali_model_autoserialises_without_a_gpu_as_the_dali_backend_does(tmp_path):
    from tritonvision_server.configs import write_repository
    from tritonvision_server.pipeline import autoserialize_model

    write_repository(spec.GPU, tmp_path / "repo")
    target = tmp_path / "model.dali"
    autoserialize_model(tmp_path / "repo" / spec.PREPROCESS / "1" / "dali.py", target)
    data = target.read_bytes()
    assert b"mixed" in data and b"hw_decoder_load" in data and spec.IMAGE.name.encode() in data
    assert b"adjust_orientation" in data  # EXIF orientation is asked for explicitly, whatever this DALI's default


def test_dali_model_is_the_shared_graph_verbatim_plus_the_profile_values():
    from importlib import resources

    from tritonvision_server.pipeline import dali_model_source

    text = dali_model_source(spec.GPU)
    graph = resources.files("tritonvision_server").joinpath("dali_graph.py").read_text()
    assert graph in text
    # Nothing but DALI is imported: the server image's Python has DALI and not necessarily this package.
    imports = {line.split()[1] for line in text.splitlines() if line.startswith(("import ", "from "))}
    assert all(name.startswith("nvidia.dali") for name in imports), imports
    assert "'mixed', 'FP16', 0.65, 256, 224" in text
    assert dali_model_source(spec.GPU.with_engine_precision("fp32")) != text


def test_dali_command_bakes_the_hardware_decoder_share_into_the_pipeline(tmp_path):
    from tritonvision_server.build_engines import main

    default, other = tmp_path / "default", tmp_path / "other"
    assert main(["dali", "--output", str(default)]) == 0
    assert main(["dali", "--output", str(other), "--hw-decoder-load", "0.25"]) == 0
    default_text = (default / "preprocess" / "1" / "dali.py").read_text()
    other_text = (other / "preprocess" / "1" / "dali.py").read_text()
    assert default_text != other_text and ", 0.25, 256, 224" in other_text
    # Reproducible: the default share gives the same file again, and the committed one.
    assert main(["dali", "--output", str(other), "--hw-decoder-load", str(spec.GPU.hw_decoder_load)]) == 0
    assert (other / "preprocess" / "1" / "dali.py").read_text() == default_text
    committed = Path(__file__).resolve().parents[1] / "model_repository" / "preprocess" / "1" / "dali.py"
    assert committed.read_text() == default_text


def test_a_bad_image_costs_one_rebuild_and_one_rerun_of_its_batch(photos):
    from tritonvision_server.pipeline import CpuPreprocessor, DecodeError

    good = photos["chelsea"]
    bad = undecodable_jpeg(good)
    as_array = lambda b: np.frombuffer(bytes(b), np.uint8)  # noqa: E731
    pre = CpuPreprocessor(max_batch_size=32, num_threads=2)
    requests = [[as_array(good)], [as_array(bad)], [as_array(photos["coffee"])], [as_array(good), as_array(good)]]
    results = pre.run_requests(requests)
    assert isinstance(results[1], DecodeError) and results[1].sample is not None
    assert pre.rebuilds == 1, "a bad image must not cost a rebuild per request"
    alone = CpuPreprocessor(max_batch_size=32, num_threads=2)
    for request, result in zip(requests, results):
        if request is not requests[1]:
            np.testing.assert_array_equal(result, alone(request))


# --- decode memory: a batch is decoded in runs within a pixel budget ---------------------------------------


def test_decoder_runs_keep_each_run_within_the_pixel_budget_and_the_batch_in_order():
    from tritonvision_server.pipeline import decoder_runs

    runs = decoder_runs([4, 1, 1, 9, 3, 3, 3, 12, 1], budget=6, max_images=32)
    assert [list(r) for r in runs] == [[0, 1, 2], [3], [4, 5], [6], [7], [8]]
    # Whatever the budget, a run holds at most max_images images, and an image over the budget runs alone.
    assert [len(r) for r in decoder_runs([1] * 70, budget=10**9, max_images=32)] == [32, 32, 6]
    assert [len(r) for r in decoder_runs([7, 7], budget=6, max_images=32)] == [1, 1]


def test_a_full_batch_of_ordinary_photos_is_one_run_and_of_images_at_the_limit_one_run_each():
    from tritonvision_server.pipeline import decoder_runs

    batch = spec.CPU.preprocess.batching.max_batch_size
    limits = spec.IMAGE_LIMITS
    # 32 photos of 3.75 MP (a 2-3 MP photo is typical) still decode together, as before the budget.
    assert len(decoder_runs([limits.max_pixels // batch] * batch, max_images=batch)) == 1
    # 32 images at the size limit decode one at a time, not all at once (6 GB held for 16 of them).
    assert [len(r) for r in decoder_runs([limits.max_pixels] * batch, max_images=batch)] == [1] * batch


def test_a_batch_of_large_images_is_decoded_in_runs_within_the_pixel_budget(photos):
    from PIL import Image

    from tritonvision_server.pipeline import CpuPreprocessor

    def solid(width, height):
        out = io.BytesIO()
        Image.new("RGB", (width, height), (120, 80, 200)).save(out, "JPEG", quality=50)
        return np.frombuffer(out.getvalue(), np.uint8)

    small, large = np.frombuffer(photos["chelsea"], np.uint8), solid(1500, 1000)  # 0.14 MP and 1.5 MP
    images = [small, large, small, large, large, small, small]
    pixels = [451 * 300 if image is small else 1_500_000 for image in images]
    pre = CpuPreprocessor(max_batch_size=32, num_threads=2, run_pixels=2_000_000)
    out = pre(images, pixels=pixels)
    assert pre.runs == 3  # [small, large, small] [large] [large, small, small], each within 2 MP
    one_by_one = CpuPreprocessor(max_batch_size=1, num_threads=1)
    np.testing.assert_array_equal(out, np.concatenate([one_by_one([image]) for image in images]))

    # Without sizes the pipeline reads them from the headers itself: the same runs.
    pre.runs = 0
    np.testing.assert_array_equal(pre(images), out)
    assert pre.runs == 3

    # Requests keep their images and order when their images are split over runs.
    requests = [[small, large], [small], [large, large, small], [small]]
    sizes = [[451 * 300, 1_500_000], [451 * 300], [1_500_000, 1_500_000, 451 * 300], [451 * 300]]
    results = pre.run_requests(requests, pixels=sizes)
    for request, result in zip(requests, results):
        np.testing.assert_array_equal(result, np.concatenate([one_by_one([image]) for image in request]))


def test_a_bad_image_in_a_later_run_fails_only_its_request_and_reruns_only_its_run(photos):
    from tritonvision_server.pipeline import CpuPreprocessor, DecodeError

    good = np.frombuffer(photos["chelsea"], np.uint8)
    bad = np.frombuffer(undecodable_jpeg(photos["chelsea"]), np.uint8)
    size = 451 * 300
    pre = CpuPreprocessor(max_batch_size=32, num_threads=2, run_pixels=2 * size)
    requests = [[good], [good, good], [good, bad], [good]]  # runs: [0, 1a] [1b, 2a] [2b, 3]
    results = pre.run_requests(requests, pixels=[[size] * len(r) for r in requests])
    assert isinstance(results[2], DecodeError) and results[2].sample == 1  # the request's own second image
    assert pre.rebuilds == 1
    assert pre.runs == 4, "three runs and one rerun: only the failed run runs again, without the bad request"
    alone = CpuPreprocessor(max_batch_size=32, num_threads=2)
    for i in (0, 1, 3):
        np.testing.assert_array_equal(results[i], alone(requests[i]))


def test_when_dali_names_no_image_the_runs_requests_are_decoded_one_by_one(photos, monkeypatch):
    from tritonvision_server import pipeline

    monkeypatch.setattr(pipeline, "_failed_sample", lambda error: None)  # as if DALI's message changed
    good = np.frombuffer(photos["chelsea"], np.uint8)
    bad = np.frombuffer(undecodable_jpeg(photos["chelsea"]), np.uint8)
    size = 451 * 300
    pre = pipeline.CpuPreprocessor(max_batch_size=32, num_threads=2, run_pixels=3 * size)
    requests = [[good], [bad, good], [good], [good]]  # runs: [0, 1a, 1b] [2, 3]
    results = pre.run_requests(requests, pixels=[[size] * len(r) for r in requests])
    assert isinstance(results[1], pipeline.DecodeError) and results[1].sample is None
    assert pre.runs == 4, "the failed run, then its two requests alone, then the second run"
    alone = pipeline.CpuPreprocessor(max_batch_size=32, num_threads=2)
    for i in (0, 2, 3):
        np.testing.assert_array_equal(results[i], alone(requests[i]))
