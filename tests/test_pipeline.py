"""The DALI preprocessing pipeline: the gpu profile's serialisation, and the shared function against torchvision."""

from __future__ import annotations

import io

import numpy as np
import pytest

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


def _jpeg(array: np.ndarray, mode: str | None = None, **kwargs) -> bytes:
    from PIL import Image

    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def odd_photos(photos) -> dict[str, bytes]:
    """Real photos at odd sizes and aspect ratios, EXIF-rotated, CMYK and greyscale."""
    import skimage.data
    from PIL import Image

    chelsea, coffee, astronaut = skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return {
        **photos,
        "odd_333x257": _jpeg(coffee[:257, :333]),
        "tall_97x301": _jpeg(astronaut[:301, 200:297]),
        "wide_511x129": _jpeg(chelsea[100:229, :511 if chelsea.shape[1] >= 511 else None]),
        "tiny_57x43": _jpeg(coffee[100:143, 100:157]),
        "exif_rotated": _jpeg(coffee[:300, :451], exif=exif.tobytes()),
        "cmyk": _jpeg(chelsea, mode="CMYK"),
        "greyscale": _jpeg(astronaut, mode="L"),
    }


@pytest.mark.parametrize("pixels_dtype", ["FP32", "FP16"])
def test_cpu_pipeline_matches_torchvision_reference_within_0_02(odd_photos, pixels_dtype):
    from tritonvision_server.pipeline import CpuPreprocessor

    names = sorted(odd_photos)
    pre = CpuPreprocessor(max_batch_size=len(names), num_threads=2, pixels_dtype=pixels_dtype)
    out = pre([np.frombuffer(odd_photos[n], np.uint8) for n in names])
    assert out.shape == (len(names), 3, 224, 224)
    assert out.dtype == (np.float16 if pixels_dtype == "FP16" else np.float32)
    diffs = {n: float(np.abs(out[i].astype(np.float32) - _reference(odd_photos[n])).max()) for i, n in enumerate(names)}
    worst = max(diffs, key=diffs.get)
    print(f"max abs diff vs torchvision ({pixels_dtype}): {diffs}")
    assert diffs[worst] <= 0.02, f"max abs diff per photo: {diffs}"


def test_exif_rotation_is_applied_not_ignored(odd_photos):
    # Guards the test above: with the orientation ignored the rotated photo would differ by far more than 0.02.
    from PIL import Image

    from tritonvision_server.pipeline import CpuPreprocessor

    data = odd_photos["exif_rotated"]
    unrotated = _jpeg(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    pre = CpuPreprocessor(max_batch_size=1, num_threads=1)
    out = pre([np.frombuffer(data, np.uint8)])[0]
    assert np.abs(out - _reference(unrotated)).max() > 0.5


def test_gpu_decoder_pipeline_serialises_without_a_gpu_and_only_once(tmp_path):
    from tritonvision_server.pipeline import serialize_gpu_pipeline

    path = tmp_path / "preprocess" / "1" / "model.dali"
    assert serialize_gpu_pipeline(path, spec.GPU) is True
    data = path.read_bytes()
    assert b"mixed" in data and b"hw_decoder_load" in data and spec.IMAGE.name.encode() in data
    mtime = path.stat().st_mtime_ns
    assert serialize_gpu_pipeline(path, spec.GPU) is False  # idempotent: same pipeline, no rewrite
    assert path.stat().st_mtime_ns == mtime


def test_serialised_pipeline_follows_the_engine_precision(tmp_path):
    from tritonvision_server.pipeline import serialize_gpu_pipeline

    fp16, fp32 = tmp_path / "fp16.dali", tmp_path / "fp32.dali"
    serialize_gpu_pipeline(fp16, spec.GPU)
    serialize_gpu_pipeline(fp32, spec.GPU.with_engine_precision("fp32"))
    assert fp16.read_bytes() != fp32.read_bytes()


def test_dali_command_bakes_the_hardware_decoder_share_into_the_pipeline(tmp_path):
    from tritonvision_server.build import main

    default, other = tmp_path / "default", tmp_path / "other"
    assert main(["dali", "--output", str(default)]) == 0
    assert main(["dali", "--output", str(other), "--hw-decoder-load", "0.25"]) == 0
    default_bytes = (default / "preprocess" / "1" / "model.dali").read_bytes()
    other_bytes = (other / "preprocess" / "1" / "model.dali").read_bytes()
    assert default_bytes != other_bytes
    # Reproducible: the default share gives the same file again.
    assert main(["dali", "--output", str(other), "--hw-decoder-load", str(spec.GPU.hw_decoder_load)]) == 0
    assert (other / "preprocess" / "1" / "model.dali").read_bytes() == default_bytes


def test_a_bad_image_costs_one_rebuild_and_one_rerun_of_its_batch(photos):
    import struct

    from tritonvision_server.pipeline import CpuPreprocessor, DecodeError

    good = photos["chelsea"]
    i = 2
    while good[i + 1] != 0xDA:
        i += 2 + struct.unpack(">H", good[i + 2 : i + 4])[0]
    bad = bytearray(good)
    bad[i + 6] = 0x77  # the scan names Huffman tables that do not exist: only decoding finds it
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
