"""The gpu profile: its configs, the TensorRT build logic that runs without TensorRT, and the validate step."""

from __future__ import annotations

import json
import queue
from pathlib import Path

import numpy as np
import pytest

from tritonvision import spec
from tritonvision_server import configs, engines
from tritonvision_server.configs import mc

H100 = engines.GpuInfo("NVIDIA H100 80GB HBM3", "9.0")


# --- configs --------------------------------------------------------------------------------------------


def test_ensemble_interface_is_identical_to_the_cpu_profile():
    gpu, cpu = configs.ensemble_config(spec.GPU), configs.ensemble_config(spec.CPU)
    assert list(gpu.input) == list(cpu.input) and list(gpu.output) == list(cpu.output)


def test_validate_step_runs_before_dali_and_passes_its_bytes_on():
    steps = configs.ensemble_config(spec.GPU).ensemble_scheduling.step
    assert [s.model_name for s in steps] == [spec.VALIDATE, spec.PREPROCESS, spec.RESNET50]
    # DALI takes the image from the ensemble input and validate's verdict, so it waits for the check.
    assert steps[1].input_map == {spec.IMAGE.name: spec.IMAGE.name, spec.ACCEPTED.name: steps[0].output_map[spec.ACCEPTED.name]}
    assert [i.name for i in configs.preprocess_config(spec.GPU).input] == [spec.IMAGE.name, spec.ACCEPTED.name]
    assert [i.name for i in configs.preprocess_config(spec.CPU).input] == [spec.IMAGE.name]
    validate = configs.validate_config(spec.GPU)
    assert validate.backend == "python" and validate.input[0].allow_ragged_batch


def test_preprocess_is_dali_on_the_gpu_with_ragged_input_and_the_engine_input_dtype():
    cfg = configs.preprocess_config(spec.GPU)
    assert cfg.backend == "dali" and cfg.default_model_filename == "dali.py"
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert cfg.input[0].allow_ragged_batch
    assert cfg.output[0].data_type == mc.TYPE_FP16 == configs.resnet50_config(spec.GPU).input[0].data_type


@pytest.mark.parametrize("precision, dtype", [("fp16", mc.TYPE_FP16), ("int8", mc.TYPE_FP16), ("fp32", mc.TYPE_FP32), ("tf32", mc.TYPE_FP32)])
def test_pixels_dtype_follows_the_engine_precision(precision, dtype):
    profile = spec.GPU.with_engine_precision(precision)
    assert configs.preprocess_config(profile).output[0].data_type == dtype
    assert configs.resnet50_config(profile).input[0].data_type == dtype


def test_profile_refuses_pixels_that_the_engine_does_not_take():
    from dataclasses import replace

    with pytest.raises(ValueError, match="FP16 input"):
        replace(spec.GPU, pixels_dtype="FP32")


def test_preprocess_warms_up_on_the_shipped_photos_with_their_byte_counts():
    from PIL import Image

    cfg = configs.preprocess_config(spec.GPU)
    warmups = {w.name: w for w in cfg.model_warmup}
    assert sorted((w.batch_size, w.inputs[spec.IMAGE.name].input_data_file) for w in warmups.values()) == [
        (1, "photo.jpg"), (1, "photo_12mp.jpg"), (spec.GPU.max_batch_size, "photo.jpg")]
    committed = Path(__file__).resolve().parents[1] / "model_repository" / spec.PREPROCESS
    for source, file in ((configs.WARMUP_SOURCE, configs.WARMUP_FILE), (configs.WARMUP_LARGE_SOURCE, configs.WARMUP_LARGE_FILE)):
        assert (committed / file).read_bytes() == source.read_bytes()
        for w in warmups.values():
            if w.inputs[spec.IMAGE.name].input_data_file == Path(file).name:
                assert list(w.inputs[spec.IMAGE.name].dims) == [source.stat().st_size]
    # The large warm-up photo is what makes the decoder allocate for real uploads: a 12-megapixel photo.
    with Image.open(configs.WARMUP_LARGE_SOURCE) as large:
        assert large.width * large.height >= 12_000_000


def test_cuda_graphs_run_every_dynamic_batch_size_padded_to_the_next_captured_one():
    graphs = configs.resnet50_config(spec.GPU).optimization.cuda.graph_spec
    sizes = sorted(spec.GPU.cuda_graph_batch_sizes)
    assert [g.batch_size for g in graphs] == sizes
    assert [g.graph_lower_bound.batch_size for g in graphs] == [1] + [s + 1 for s in sizes[:-1]]
    assert sizes[-1] == spec.GPU.resnet50.batching.max_batch_size
    # Every batch the dynamic batcher can form falls in exactly one graph's range, the smallest that holds it.
    for batch in range(1, spec.GPU.resnet50.batching.max_batch_size + 1):
        holding = [g.batch_size for g in graphs if g.graph_lower_bound.batch_size <= batch <= g.batch_size]
        assert holding == [min(s for s in sizes if s >= batch)], batch


def test_resnet50_is_a_tensorrt_plan_with_cuda_graphs_inside_the_engine_profile():
    cfg = configs.resnet50_config(spec.GPU)
    assert cfg.platform == "tensorrt_plan"
    assert cfg.instance_group[0].count == spec.GPU.resnet50.instances
    assert cfg.output[0].label_filename == configs.LABELS_FILE
    ((low, opt, high),) = engines.optimization_profiles(spec.GPU.resnet50.batching)
    assert all(low <= b <= high for b in cfg.dynamic_batching.preferred_batch_size)
    assert cfg.optimization.cuda.graphs
    assert all(low <= g.batch_size <= high for g in cfg.optimization.cuda.graph_spec)


# --- optimisation profiles, engine identity, staleness ----------------------------------------------------


def test_optimization_profile_covers_1_to_max_tuned_at_the_largest_preferred_size():
    assert engines.optimization_profiles(spec.Batching(128, (32, 64, 128), 100)) == [(1, 128, 128)]
    assert engines.optimization_profiles(spec.Batching(256, (16, 48), 100)) == [(1, 48, 256)]
    assert engines.optimization_profiles(spec.Batching(8, (), 0)) == [(1, 8, 8)]


def test_nvidia_smi_output_is_parsed_into_gpu_name_and_compute_capability():
    text = "NVIDIA H100 80GB HBM3, 9.0\nNVIDIA A100-SXM4-40GB, 8.0\n"
    assert engines.parse_nvidia_smi(text) == [H100, engines.GpuInfo("NVIDIA A100-SXM4-40GB", "8.0")]
    with pytest.raises(ValueError):
        engines.parse_nvidia_smi("No devices were found")


@pytest.mark.parametrize("banner, version", [
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v8601] # trtexec", "8.6.1"),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --help", "10.3.0"),
    ("[TensorRT v101300]", "10.13.0"),
])
def test_trtexec_banner_gives_the_tensorrt_version(banner, version):
    assert engines.parse_trtexec_version(banner) == version


def _wanted(onnx: Path, gpu=H100, trt="10.3.0", precision="fp16") -> engines.EngineSpec:
    return engines.wanted_engine(onnx, spec.EngineBuild(precision=precision), spec.GPU.resnet50.batching, gpu=gpu, trt_version=trt)


@pytest.fixture()
def fake_onnx(tmp_path) -> Path:
    path = tmp_path / "resnet50.onnx"
    path.write_bytes(b"onnx bytes")
    return path


def test_engine_file_name_records_precision_gpu_compute_capability_and_tensorrt(fake_onnx):
    stem = _wanted(fake_onnx).file_stem
    assert stem == "resnet50_fp16_h100-80gb-hbm3_sm90_trt10.3.0_b128"


def test_engine_metadata_round_trips_through_json(fake_onnx):
    wanted = _wanted(fake_onnx)
    assert engines.EngineSpec.from_json(json.loads(json.dumps(wanted.to_json()))) == wanted


class FakeBuilds:
    """Stands in for trtexec: records builds and writes a plan file."""

    def __init__(self, monkeypatch, gpu=H100, trt="10.3.0"):
        self.count = 0
        self.gpu, self.trt = gpu, trt
        monkeypatch.setattr(engines, "find_builder", lambda prefer="auto": "trtexec")
        monkeypatch.setattr(engines, "detect_gpu", lambda index=0: self.gpu)
        monkeypatch.setattr(engines, "tensorrt_version", lambda builder: self.trt)
        monkeypatch.setattr(engines, "_build_with_trtexec", self._build)

    def _build(self, onnx, plan, spec_, timing_cache, calibration_cache):
        self.count += 1
        plan.write_bytes(f"engine {self.count} for {spec_.file_stem}".encode())


def _ensure(onnx, tmp_path, **kw):
    return engines.ensure_engine(onnx, tmp_path / "repo" / "resnet50" / "1" / "model.plan", spec.GPU.engine,
                                 spec.GPU.resnet50.batching, engine_dir=tmp_path / "engines", **kw)


def test_engine_is_built_once_then_reused(monkeypatch, tmp_path, fake_onnx):
    builds = FakeBuilds(monkeypatch)
    dest = _ensure(fake_onnx, tmp_path)
    first = dest.read_bytes()
    _ensure(fake_onnx, tmp_path)
    assert builds.count == 1 and dest.read_bytes() == first
    _ensure(fake_onnx, tmp_path, force=True)
    assert builds.count == 2


@pytest.mark.parametrize("change", ["gpu", "tensorrt", "onnx", "tampered plan"])
def test_engine_is_rebuilt_when_what_it_was_built_for_changes(monkeypatch, tmp_path, fake_onnx, change):
    builds = FakeBuilds(monkeypatch)
    dest = _ensure(fake_onnx, tmp_path)
    if change == "gpu":
        builds.gpu = engines.GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")
    elif change == "tensorrt":
        builds.trt = "10.4.0"
    elif change == "onnx":
        fake_onnx.write_bytes(b"other weights")
    else:
        plan = next((tmp_path / "engines").glob("*.plan"))
        plan.write_bytes(b"truncated")
    _ensure(fake_onnx, tmp_path)
    assert builds.count == 2
    assert dest.read_bytes().startswith(b"engine 2")


# One different value per field of the engine's identity; a field that the file name does not show (or
# shows, like the TensorRT version) must still make a recorded engine stale on its own.
OTHER_VALUE = {
    "gpu_name": "NVIDIA H100 PCIe",
    "compute_capability": "8.9",
    "tensorrt_version": "10.2.0",
    "precision": "fp32",
    "input_dtype": "FP32",
    "onnx_sha256": "0" * 64,
    "profiles": ((1, 64, 128),),
    "workspace_mib": 1024,
    "calibration_cache_sha256": "f" * 64,
}


@pytest.mark.parametrize("field", sorted(OTHER_VALUE))
def test_recorded_engine_under_the_same_file_name_is_stale_when_one_field_differs(tmp_path, fake_onnx, field):
    import dataclasses

    wanted = _wanted(fake_onnx)
    assert set(OTHER_VALUE) == {f.name for f in dataclasses.fields(engines.EngineSpec)}
    assert getattr(wanted, field) != OTHER_VALUE[field]
    plan, meta = engines.engine_paths(tmp_path, wanted)
    plan.write_bytes(b"an engine")

    def record(built: engines.EngineSpec) -> None:
        meta.write_text(json.dumps({"engine": built.to_json(), "plan_sha256": engines.sha256(plan)}))

    record(wanted)
    assert engines.is_up_to_date(plan, meta, wanted)  # the same engine: reused
    # The metadata says it was built for something else, under the very file name wanted: rebuild.
    record(dataclasses.replace(wanted, **{field: OTHER_VALUE[field]}))
    assert not engines.is_up_to_date(plan, meta, wanted), (
        f"an engine recorded with {field}={OTHER_VALUE[field]!r} was reused for {field}={getattr(wanted, field)!r}")


def test_engines_for_different_gpus_coexist_and_are_reinstalled_without_rebuilding(monkeypatch, tmp_path, fake_onnx):
    builds = FakeBuilds(monkeypatch)
    _ensure(fake_onnx, tmp_path)
    builds.gpu = engines.GpuInfo("NVIDIA H200", "9.0")
    dest = _ensure(fake_onnx, tmp_path)
    builds.gpu = H100
    _ensure(fake_onnx, tmp_path)
    assert builds.count == 2 and len(list((tmp_path / "engines").glob("*.plan"))) == 2
    assert b"h100" in dest.read_bytes()


def test_trtexec_command_line_for_fp16(tmp_path, fake_onnx):
    cmd = engines.trtexec_command(Path("/usr/src/tensorrt/bin/trtexec"), fake_onnx, tmp_path / "e.plan",
                                  _wanted(fake_onnx), timing_cache=tmp_path / "t.cache")
    assert cmd[0] == "/usr/src/tensorrt/bin/trtexec"
    for arg in ("--fp16", "--minShapes=PIXELS:1x3x224x224", "--optShapes=PIXELS:128x3x224x224",
                "--maxShapes=PIXELS:128x3x224x224", "--inputIOFormats=fp16:chw", "--outputIOFormats=fp32:chw",
                "--memPoolSize=workspace:4096M", f"--timingCacheFile={tmp_path / 't.cache'}",
                f"--saveEngine={tmp_path / 'e.plan'}", f"--onnx={fake_onnx}"):
        assert arg in cmd
    assert "--int8" not in cmd and "--noTF32" not in cmd


def test_trtexec_command_line_for_fp32_disables_tf32_and_keeps_an_fp32_input(tmp_path, fake_onnx):
    cmd = engines.trtexec_command(Path("trtexec"), fake_onnx, tmp_path / "e.plan", _wanted(fake_onnx, precision="fp32"),
                                  timing_cache=tmp_path / "t.cache")
    assert "--noTF32" in cmd and "--inputIOFormats=fp32:chw" in cmd and "--fp16" not in cmd


def test_trtexec_int8_needs_a_calibration_cache(tmp_path, fake_onnx):
    wanted = _wanted(fake_onnx, precision="int8")
    with pytest.raises(engines.TensorRTUnavailable, match="cannot calibrate"):
        engines.trtexec_command(Path("trtexec"), fake_onnx, tmp_path / "e.plan", wanted, timing_cache=tmp_path / "t")
    cmd = engines.trtexec_command(Path("trtexec"), fake_onnx, tmp_path / "e.plan", wanted, timing_cache=tmp_path / "t",
                                  calibration_cache=tmp_path / "calib.cache")
    assert "--int8" in cmd and f"--calib={tmp_path / 'calib.cache'}" in cmd and "--inputIOFormats=fp16:chw" in cmd


def test_without_tensorrt_the_build_stops_with_how_to_get_it(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_tensorrt(name, *args, **kwargs):
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorrt)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(engines, "TRTEXEC_NGC", tmp_path / "no-trtexec")
    with pytest.raises(engines.TensorRTUnavailable) as err:
        engines.find_builder()
    for hint in ("nvcr.io/nvidia/tritonserver", "nvcr.io/nvidia/tensorrt", "/usr/src/tensorrt/bin/trtexec", "pip install tensorrt"):
        assert hint in str(err.value)


def test_engine_subcommand_exits_2_with_the_message_when_tensorrt_is_missing(monkeypatch, tmp_path, caplog, fake_onnx):
    from tritonvision_server.build import main

    def missing(prefer="auto"):
        raise engines.TensorRTUnavailable(engines.HOW_TO_GET_TENSORRT)

    monkeypatch.setattr(engines, "find_builder", missing)
    assert main(["engine", "--onnx", str(fake_onnx), "--output", str(tmp_path / "repo")]) == 2
    assert "pip install tensorrt" in caplog.text


def test_calibration_batches_go_through_the_serving_preprocessing():
    from tritonvision._images import sample_paths

    samples = sample_paths()[0].parent
    files = engines.calibration_images(samples, limit=10)
    batches = list(engines.calibration_batches(files, batch_size=2, num_threads=1))
    assert len(batches) == len(files) // 2
    assert batches[0].shape == (2, 3, 224, 224) and batches[0].dtype == np.float32
    assert -3 < batches[0].min() < 0 < batches[0].max() < 3  # normalised, not raw 0..255


@pytest.mark.gpu
def test_tensorrt_builds_a_loadable_fp16_engine(tmp_path, onnx_path):
    try:
        import tensorrt as trt
    except ImportError:
        pytest.skip("TensorRT is not importable here (use the NGC tensorrt/tritonserver image, or pip install tensorrt)")
    dest = engines.ensure_engine(onnx_path, tmp_path / "model.plan", spec.GPU.engine, spec.GPU.resnet50.batching,
                                 engine_dir=tmp_path / "engines", builder="python")
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(dest.read_bytes())
    assert engine.get_tensor_dtype(spec.PIXELS("FP16").name) == trt.float16
    assert tuple(engine.get_tensor_profile_shape(spec.PIXELS("FP16").name, 0)[2]) == (128, 3, 224, 224)


# --- the validate step, in the real (bundled) Triton server -----------------------------------------------


@pytest.fixture(scope="module")
def validate_server(tmp_path_factory):
    """Only the gpu profile's validate model, batching with a long delay so concurrent requests share a batch."""
    from tritonvision_server.launcher import TritonServer

    repo = tmp_path_factory.mktemp("validate_repo")
    cfg = configs.validate_config(spec.GPU)
    cfg.instance_group[0].count = 1
    cfg.dynamic_batching.max_queue_delay_microseconds = 300_000
    (repo / spec.VALIDATE / "1").mkdir(parents=True)
    (repo / spec.VALIDATE / "config.pbtxt").write_text(configs.text_format.MessageToString(cfg))
    (repo / spec.VALIDATE / "1" / "model.py").write_text(
        configs._BACKEND_STUB.format(module="tritonvision_server.backends.validate"))
    with TritonServer(repo) as server:
        yield server


def test_corrupt_upload_fails_only_its_own_request_in_a_shared_batch(validate_server, photos):
    import tritonclient.grpc as grpcclient

    good = [photos["chelsea"], photos["coffee"], photos["astronaut"]]
    uploads = [good[0], good[1][: len(good[1]) // 2], good[2], b"not an image at all"]
    results: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(validate_server.grpc_url) as client:
        for i, data in enumerate(uploads):
            inp = grpcclient.InferInput(spec.IMAGE.name, [1, len(data)], "UINT8")
            inp.set_data_from_numpy(np.frombuffer(data, np.uint8)[None])
            client.async_infer(spec.VALIDATE, [inp], lambda result, error, i=i: results.put((i, result, error)))
        got = dict((i, (r, e)) for i, r, e in (results.get(timeout=30) for _ in uploads))
        stats = client.get_inference_statistics(spec.VALIDATE).model_stats[0]
    for i in (0, 2):
        result, error = got[i]
        assert error is None
        assert result.as_numpy(spec.ACCEPTED.name).tolist() == [[1]]
    for i, reason in ((1, "truncated JPEG"), (3, "not a supported image")):
        result, error = got[i]
        assert result is None and reason in error.message()
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert max(b.batch_size for b in stats.batch_stats) > 1, "the requests were not batched together"
