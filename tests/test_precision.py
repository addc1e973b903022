"""The FP16 and INT8 ONNX files the engines are built from, run in ONNX Runtime against the FP32 export.

Thresholds, on the held photos (scikit-image's, and rotations and crops of them; the INT8 calibration sees
other images), random weights seed 0: the FP16 file gives the same top-1 on every photo and scores within
1e-3 of FP32 (measured: 4e-5); the INT8 file gives the same top-1 on at least 3 in 4 photos, a top-5 that
shares at least 3 of 5 classes on average, and scores within 2e-2 (measured on 26 images: 96.2% top-1,
2.6e-3; see benchmarks/precision_agreement.py). The untrained network puts most photos on one class, so
the score bound and the top-5 overlap are the sharper checks here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tritonvision import spec
from tritonvision_server import precision

from image_helpers import encode


@pytest.fixture(scope="session")
def calibration_dir(tmp_path_factory) -> Path:
    """Mirrored crops of scikit-image photos that are not among the held ones."""
    import skimage.data

    folder = tmp_path_factory.mktemp("calibration")
    for name in ("hubble_deep_field", "immunohistochemistry", "retina", "camera", "coins", "colorwheel"):
        a = getattr(skimage.data, name)()
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        a = np.ascontiguousarray(a[:, ::-1, :3][a.shape[0] // 10 :])
        (folder / f"{name}.jpg").write_bytes(encode(a, quality=85))
    return folder


@pytest.fixture(scope="session")
def fp16_onnx(onnx_path) -> Path:
    return precision.make_fp16(onnx_path)


@pytest.fixture(scope="session")
def int8_onnx(onnx_path, calibration_dir) -> Path:
    files = precision.calibration_images(calibration_dir, limit=16)
    return precision.make_int8(onnx_path, files, batch_size=3, num_threads=1)


@pytest.fixture(scope="session")
def held_pixels(photos) -> np.ndarray:
    import skimage.data

    from tritonvision_server.pipeline import CpuPreprocessor

    cat, astronaut, coffee = skimage.data.chelsea(), skimage.data.astronaut(), skimage.data.coffee()
    variants = [np.rot90(cat), astronaut[64:448, 128:], np.rot90(coffee, 2)]
    images = list(photos.values()) + [encode(np.ascontiguousarray(v), quality=90) for v in variants]
    pre = CpuPreprocessor(max_batch_size=8, num_threads=1, pixels_dtype="FP32")
    return pre([np.frombuffer(b, np.uint8) for b in images])


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _scores(path: Path, pixels: np.ndarray, dtype=np.float32) -> np.ndarray:
    session = _session(path)
    (out,) = session.run(None, {spec.PIXELS("FP32").name: pixels.astype(dtype)})
    return out


@pytest.fixture(scope="session")
def fp32_scores(onnx_path, held_pixels) -> np.ndarray:
    return _scores(onnx_path, held_pixels)


def _ops(path: Path) -> list:
    import onnx

    return list(onnx.load(str(path)).graph.node)


# --- file names and records -----------------------------------------------------------------------------


@pytest.mark.parametrize("engine_precision, name", [
    ("fp16", "resnet50_fp16.onnx"), ("int8", "resnet50_int8.onnx"), ("fp32", "resnet50.onnx"), ("tf32", "resnet50.onnx"),
])
def test_each_engine_precision_has_its_onnx_file_next_to_the_fp32_export(engine_precision, name):
    assert precision.onnx_path(Path("build/resnet50.onnx"), engine_precision) == Path("build") / name


def test_fp16_onnx_takes_fp16_pixels_and_returns_fp32_scores(fp16_onnx):
    session = _session(fp16_onnx)
    assert [(i.name, i.type) for i in session.get_inputs()] == [("PIXELS", "tensor(float16)")]
    assert [(o.name, o.type) for o in session.get_outputs()] == [("SCORES", "tensor(float)")]
    import onnx

    model = onnx.load(str(fp16_onnx))
    weights = [i for i in model.graph.initializer if len(i.dims) == 4]  # convolution kernels
    assert weights and all(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)


def test_fp16_onnx_agrees_with_fp32_on_held_photos(fp16_onnx, held_pixels, fp32_scores):
    got = _scores(fp16_onnx, held_pixels, np.float16)
    assert got.dtype == np.float32
    assert (got.argmax(1) == fp32_scores.argmax(1)).all()
    assert np.abs(got - fp32_scores).max() < 1e-3
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-4)  # the softmax ran in FP32


def test_int8_onnx_has_explicit_qdq_on_every_convolution_and_the_classifier(int8_onnx):
    nodes = _ops(int8_onnx)
    producer = {out: n for n in nodes for out in n.output}
    ops = [n.op_type for n in nodes]
    assert ops.count("QuantizeLinear") >= 54 and ops.count("DequantizeLinear") >= 54
    for node in (n for n in nodes if n.op_type in ("Conv", "Gemm")):
        for tensor in node.input[:2]:  # activation and weights
            assert producer[tensor].op_type == "DequantizeLinear", f"{node.name} input {tensor} is not dequantised"
    # the network's input is quantised as it is, FP16, with no cast in front
    first = [n for n in nodes if spec.PIXELS("FP16").name in n.input]
    assert [n.op_type for n in first] == ["QuantizeLinear"]


def test_int8_onnx_runs_in_onnx_runtime_with_fp16_pixels_and_agrees_with_fp32(int8_onnx, held_pixels, fp32_scores):
    session = _session(int8_onnx)
    assert [i.type for i in session.get_inputs()] == ["tensor(float16)"]
    assert [o.type for o in session.get_outputs()] == ["tensor(float)"]
    got = _scores(int8_onnx, held_pixels, np.float16)
    top1 = np.mean(got.argmax(1) == fp32_scores.argmax(1))
    top5 = np.mean([len(set(np.argsort(-a)[:5]) & set(np.argsort(-b)[:5])) for a, b in zip(got, fp32_scores)])
    assert top1 >= 0.75, f"INT8 top-1 agrees with FP32 on only {top1:.0%} of the held photos"
    assert top5 >= 3
    assert np.abs(got - fp32_scores).max() < 2e-2
    assert not np.array_equal(got, fp32_scores)  # it is quantised, not the FP32 network again


def test_records_say_what_each_file_was_made_from(onnx_path, fp16_onnx, int8_onnx, calibration_dir):
    fp16, int8 = precision.read_sidecar(fp16_onnx), precision.read_sidecar(int8_onnx)
    source_sha = precision.sha256_file(onnx_path)
    for record in (fp16, int8):
        assert record["source_sha256"] == source_sha and record["weights"] == "random:0"
        assert record["input_dtype"] == "FP16" and record["tools"]["nvidia-modelopt"] != "missing"
    assert fp16["precision"] == "fp16" and fp16["calibration"] is None
    files = precision.calibration_images(calibration_dir, limit=16)
    assert int8["precision"] == "int8"
    assert int8["calibration"] == {"images": len(files), "sha256": precision.calibration_set_sha256(files),
                                   "method": "entropy"}


def test_up_to_date_files_are_not_made_again_and_changed_inputs_are(onnx_path, fp16_onnx, int8_onnx, monkeypatch):
    before = fp16_onnx.stat().st_mtime_ns
    assert precision.make_fp16(onnx_path) == fp16_onnx and fp16_onnx.stat().st_mtime_ns == before
    wanted = {k: v for k, v in precision.read_sidecar(int8_onnx).items() if k != "seconds"}
    assert precision._up_to_date(int8_onnx, wanted)
    for key, value in (("source_sha256", "0" * 64), ("weights", "random:1"),
                       ("calibration", {**wanted["calibration"], "sha256": "f" * 64}),
                       ("tools", {**wanted["tools"], "nvidia-modelopt": "0.48.0"})):
        assert not precision._up_to_date(int8_onnx, {**wanted, key: value}), key


def test_int8_needs_calibration_images(onnx_path, tmp_path):
    with pytest.raises(ValueError, match="calibration-images"):
        precision.ensure_onnx(onnx_path, "int8")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="no calibration images"):
        precision.calibration_images(tmp_path, limit=4)


def test_calibration_goes_through_the_serving_preprocessing(calibration_dir):
    from tritonvision_server.pipeline import CpuPreprocessor

    files = precision.calibration_images(calibration_dir, limit=10)
    pixels = precision.calibration_pixels(files, num_threads=1)
    assert pixels.shape == (len(files), 3, 224, 224) and pixels.dtype == np.float32
    assert -3 < pixels.min() < 0 < pixels.max() < 3  # normalised, not raw 0..255
    reference = CpuPreprocessor(max_batch_size=1, num_threads=1)([np.fromfile(files[0], np.uint8)])
    np.testing.assert_array_equal(pixels[:1], reference)


def test_fp16_input_surgery_refuses_an_input_read_by_something_other_than_a_cast():
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["PIXELS"], ["SCORES"])], "g",
        [helper.make_tensor_value_info("PIXELS", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("SCORES", TensorProto.FLOAT, [1, 3])],
    )
    with pytest.raises(ValueError, match="not only by a Cast"):
        precision.take_fp16_input(helper.make_model(graph))
    cast = helper.make_graph(
        [helper.make_node("Cast", ["PIXELS"], ["half"], to=TensorProto.FLOAT16),
         helper.make_node("Cast", ["half"], ["SCORES"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("PIXELS", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("SCORES", TensorProto.FLOAT, [1, 3])],
    )
    model = precision.take_fp16_input(helper.make_model(cast))
    onnx.checker.check_model(model)
    assert [n.input[0] for n in model.graph.node] == ["PIXELS"]
    assert precision.io_types(model) == {"PIXELS": "FLOAT16", "SCORES": "FLOAT"}


def test_onnx_subcommand_makes_the_requested_precisions_and_is_idempotent(onnx_path, fp16_onnx, caplog):
    from tritonvision_server.build_engines import main

    caplog.set_level("INFO")
    assert main(["onnx", "--weights", "random:0", "--output", str(onnx_path), "--precision", "fp16", "fp32"]) == 0
    assert f"{fp16_onnx} is up to date" in caplog.text
    assert main(["onnx", "--weights", "random:0", "--output", str(onnx_path), "--precision", "int8"]) == 2
    assert "calibration-images" in caplog.text
    assert json.loads(precision.sidecar(onnx_path).read_text())["precision"] == "fp32"


def test_image_builds_fail_instead_of_shipping_random_weights_when_the_download_fails(monkeypatch, tmp_path, caplog):
    # The download is made to fail here (tests never reach the network): as an offline Docker build would.
    from torchvision.models import ResNet50_Weights

    from tritonvision_server.build_engines import main

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(type(ResNet50_Weights.IMAGENET1K_V2), "get_state_dict", offline)
    out = tmp_path / "resnet50.onnx"
    assert main(["onnx", "--weights", "imagenet", "--require-weights", "--output", str(out), "--precision", "fp32"]) == 2
    assert not out.exists() and "random weights were refused" in caplog.text
    # Without the flag (a developer's `make serve` offline) the export falls back loudly and records it.
    assert main(["onnx", "--weights", "imagenet", "--output", str(out), "--precision", "fp32"]) == 0
    assert json.loads(out.with_suffix(".onnx.json").read_text())["weights"] == "random:0"
    assert "COULD NOT DOWNLOAD" in caplog.text
