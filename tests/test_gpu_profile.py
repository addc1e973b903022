"""The gpu profile: its configs, the TensorRT build logic that runs without TensorRT, and the validate step."""

from __future__ import annotations

import io
import json
import queue
import time
from pathlib import Path

import numpy as np
import pytest

from image_helpers import orientation_exif
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
    assert steps[1].input_map == {spec.IMAGE.name: spec.IMAGE.name, spec.PIXEL_COUNT.name: steps[0].output_map[spec.PIXEL_COUNT.name]}
    assert [i.name for i in configs.preprocess_config(spec.GPU).input] == [spec.IMAGE.name, spec.PIXEL_COUNT.name]
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
    # The TensorRT backend honours a lower bound only when the spec and the bound both give the input's shape
    # (without the batch dimension); otherwise a graph runs its own batch size alone.
    pixels = spec.GPU.pixels
    for g in graphs:
        assert {k: list(v.dim) for k, v in g.input.items()} == {pixels.name: list(pixels.dims)}
        assert {k: list(v.dim) for k, v in g.graph_lower_bound.input.items()} == {pixels.name: list(pixels.dims)}
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
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v110100] [b106] # trtexec --help", "11.1.0"),
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


class FakeBuilder:
    """A :class:`engines.Builder` standing in for trtexec: records builds and writes a plan file.

    ``gpu`` is the GPU the tests build for (passed to ensure_engine, as nvidia-smi would report it)."""

    name = "fake"

    def __init__(self, gpu=H100, trt="10.3.0", build=None):
        self.count = 0
        self.plans: list[Path] = []
        self.onnx: list[Path] = []
        self.gpu, self.trt = gpu, trt
        self._build = build

    def tensorrt_version(self) -> str:
        return self.trt

    def build(self, onnx, plan, spec_, timing_cache):
        self.count += 1
        self.plans.append(plan)
        self.onnx.append(onnx)
        if self._build is not None:
            return self._build(onnx, plan, spec_, timing_cache)
        plan.write_bytes(f"engine {self.count} for {spec_.file_stem}".encode())


def _ensure(onnx, tmp_path, builder: FakeBuilder, **kw):
    return engines.ensure_engine(onnx, tmp_path / "repo" / "resnet50" / "1" / "model.plan", spec.GPU.engine,
                                 spec.GPU.resnet50.batching, engine_dir=tmp_path / "engines", builder=builder,
                                 gpu=builder.gpu, **kw)


def test_engine_is_built_once_then_reused(tmp_path, fake_onnx):
    builds = FakeBuilder()
    dest = _ensure(fake_onnx, tmp_path, builds)
    first = dest.read_bytes()
    _ensure(fake_onnx, tmp_path, builds)
    assert builds.count == 1 and dest.read_bytes() == first
    _ensure(fake_onnx, tmp_path, builds, force=True)
    assert builds.count == 2


def test_engine_is_built_into_a_temporary_file_and_renamed_into_place(tmp_path, fake_onnx):
    builds = FakeBuilder()
    _ensure(fake_onnx, tmp_path, builds)
    (built,) = builds.plans
    final = next((tmp_path / "engines").glob("resnet50_*.plan"))
    assert built.parent == final.parent and built != final and not built.exists()
    assert final.read_bytes().startswith(b"engine 1")
    leftovers = [p.name for p in (tmp_path / "engines").iterdir() if ".tmp" in p.name]
    assert leftovers == []


def test_a_failed_build_leaves_neither_an_engine_nor_a_temporary_file(tmp_path, fake_onnx):
    def half_written(onnx, plan, spec_, timing_cache):
        plan.write_bytes(b"half an eng")
        raise RuntimeError("trtexec failed with exit code 1")

    with pytest.raises(RuntimeError, match="exit code 1"):
        _ensure(fake_onnx, tmp_path, FakeBuilder(build=half_written))
    assert [p.name for p in (tmp_path / "engines").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize("change", ["gpu", "tensorrt", "onnx", "tampered plan"])
def test_engine_is_rebuilt_when_what_it_was_built_for_changes(tmp_path, fake_onnx, change):
    builds = FakeBuilder()
    dest = _ensure(fake_onnx, tmp_path, builds)
    if change == "gpu":
        builds.gpu = engines.GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")
    elif change == "tensorrt":
        builds.trt = "10.4.0"
    elif change == "onnx":
        fake_onnx.write_bytes(b"other weights")
    else:
        plan = next((tmp_path / "engines").glob("*.plan"))
        plan.write_bytes(b"truncated")
    _ensure(fake_onnx, tmp_path, builds)
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


def test_engines_for_different_gpus_coexist_and_are_reinstalled_without_rebuilding(tmp_path, fake_onnx):
    builds = FakeBuilder()
    _ensure(fake_onnx, tmp_path, builds)
    builds.gpu = engines.GpuInfo("NVIDIA H200", "9.0")
    dest = _ensure(fake_onnx, tmp_path, builds)
    builds.gpu = H100
    _ensure(fake_onnx, tmp_path, builds)
    assert builds.count == 2 and len(list((tmp_path / "engines").glob("*.plan"))) == 2
    assert b"h100" in dest.read_bytes()


# Run as two separate processes sharing one engine directory, the way two pods share the cache volume.
# The stand-in build takes ~1.5 s and writes its plan in pieces, so a reader could catch it half-written.
_CONCURRENT_BUILDER = r"""
import logging, sys, time
from pathlib import Path
from tritonvision import spec
from tritonvision_server import engines

onnx, dest, engine_dir, builds_log, go = map(Path, sys.argv[1:6])
logging.basicConfig(level=logging.INFO, format="%(message)s")


class SlowBuilder:
    name = "slow"

    def tensorrt_version(self):
        return "10.5.0"

    def build(self, onnx, plan, spec_, timing_cache):
        with open(builds_log, "a") as fh:
            fh.write(plan.name + "\n")
        with open(plan, "wb") as fh:
            for i in range(5):
                fh.write(bytes([65 + i]) * 100_000)
                fh.flush()
                time.sleep(0.3)


while not go.exists():
    time.sleep(0.01)
engines.ensure_engine(onnx, dest, spec.GPU.engine, spec.GPU.resnet50.batching, engine_dir=engine_dir,
                      builder=SlowBuilder(), gpu=engines.GpuInfo("NVIDIA H100 80GB HBM3", "9.0"))
"""


def test_two_processes_sharing_the_engine_dir_build_once_and_never_see_a_half_written_engine(tmp_path, fake_onnx):
    import subprocess
    import sys
    import time

    engine_dir, builds_log, go = tmp_path / "engines", tmp_path / "builds.log", tmp_path / "go"
    script = tmp_path / "builder.py"
    script.write_text(_CONCURRENT_BUILDER)
    dests = [tmp_path / f"pod{i}" / "model.plan" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(fake_onnx), str(d), str(engine_dir), str(builds_log), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for d in dests]
    time.sleep(2.0)  # both started and waiting for the go
    go.touch()
    complete = b"".join(bytes([65 + i]) * 100_000 for i in range(5))
    seen = 0
    while any(p.poll() is None for p in procs):
        for plan in engine_dir.glob("resnet50_*.plan") if engine_dir.exists() else ():
            try:
                data = plan.read_bytes()
            except FileNotFoundError:
                continue
            assert data == complete, f"{plan.name} was visible half-written ({len(data)} bytes)"
            seen += 1
        time.sleep(0.02)
    outputs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    built = builds_log.read_text().split()
    assert len(built) == 1, f"built {len(built)} times: {built}"
    assert built[0].startswith(".resnet50_") and built[0].endswith(".tmp.plan")
    assert sum("built by another process meanwhile" in out for out in outputs) == 1, outputs
    assert all(d.read_bytes() == complete for d in dests)
    assert [p.name for p in engine_dir.iterdir() if ".tmp" in p.name] == []


REMOVED_TRTEXEC_FLAGS = ("--fp16", "--int8", "--calib", "--best", "--bf16", "--fp8", "--precisionConstraints",
                         "--layerPrecisions", "--inputIOFormats", "--outputIOFormats")


@pytest.mark.parametrize("precision", sorted(spec.ENGINE_PRECISIONS))
def test_trtexec_builds_strongly_typed_without_precision_flags(tmp_path, fake_onnx, precision):
    cmd = engines.trtexec_command(Path("/usr/src/tensorrt/bin/trtexec"), fake_onnx, tmp_path / "e.plan",
                                  _wanted(fake_onnx, precision=precision), timing_cache=tmp_path / "t.cache")
    assert cmd[0] == "/usr/src/tensorrt/bin/trtexec" and "--stronglyTyped" in cmd
    for arg in ("--minShapes=PIXELS:1x3x224x224", "--optShapes=PIXELS:128x3x224x224",
                "--maxShapes=PIXELS:128x3x224x224", "--skipInference",
                # MiB without a unit: trtexec 10.0.x multiplies a suffixed value by 2^20 again (its options
                # take sizeInMiB, stod("4096M") * the suffix's multiplier), 10.1+ defaults a bare number to MiB.
                "--memPoolSize=workspace:4096", f"--timingCacheFile={tmp_path / 't.cache'}",
                f"--saveEngine={tmp_path / 'e.plan'}", f"--onnx={fake_onnx}"):
        assert arg in cmd
    assert not [a for a in cmd if a.split("=")[0] in REMOVED_TRTEXEC_FLAGS]
    # TF32 stays a builder setting under strong typing: off for fp32 engines only
    assert ("--noTF32" in cmd) == (precision == "fp32")


class _ReadOnlyTensor:
    def __init__(self, name, dtype):
        self.name, self._dtype = name, dtype

    @property
    def dtype(self):  # TensorRT 11: ITensor.dtype has no setter
        return self._dtype


def _fake_tensorrt(calls: list, *, strongly_typed_flag: bool = True):
    """A ``tensorrt`` module shaped like TensorRT 11: no FP16/INT8 builder flags, no INT8 calibrators."""
    import types

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "11.1.0"
    trt.NetworkDefinitionCreationFlag = type("NetworkDefinitionCreationFlag", (),
                                             {"STRONGLY_TYPED": 0} if strongly_typed_flag else {})
    trt.BuilderFlag = type("BuilderFlag", (), {"TF32": 6, "SPARSE_WEIGHTS": 7})
    trt.MemoryPoolType = type("MemoryPoolType", (), {"WORKSPACE": 0})
    trt.float16, trt.float32 = "half", "float"

    class Logger:
        INFO, WARNING = 1, 2

        def __init__(self, level):
            pass

    class Recorder:
        __slots__ = ("_kind",)  # no attribute can be set on it (config.int8_calibrator = ... fails)

        def __init__(self, kind):
            self._kind = kind

        def __getattr__(self, name):
            def call(*args, **kwargs):
                calls.append((self._kind, name, args))
                return self._result(name, args)
            return call

        def _result(self, name, args):
            if name == "create_network":
                return Recorder("network")
            if name in ("create_builder_config",):
                return Recorder("config")
            if name == "create_optimization_profile":
                return Recorder("profile")
            if name == "get_input":
                return _ReadOnlyTensor("PIXELS", "half")
            if name == "build_serialized_network":
                return b"plan bytes"
            if name in ("create_timing_cache", "get_timing_cache"):
                return Recorder("timing_cache")
            if name == "serialize":
                return b"timing bytes"
            return None

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("parser", "parse_from_file", (path,)))
            return True

    trt.Logger, trt.OnnxParser = Logger, OnnxParser
    trt.Builder = lambda logger: Recorder("builder")
    return trt


@pytest.mark.parametrize("precision", ["fp16", "int8", "fp32", "tf32"])
def test_python_builder_uses_only_api_that_tensorrt_11_has(monkeypatch, tmp_path, precision):
    import sys

    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(calls))
    onnx = tmp_path / f"resnet50_{precision}.onnx"
    onnx.write_bytes(b"onnx")
    build = spec.EngineBuild(precision=precision)
    dest = engines.ensure_engine(onnx, tmp_path / "model.plan", build, spec.GPU.resnet50.batching,
                                 engine_dir=tmp_path / "engines", builder=engines.PythonApiBuilder(), gpu=H100)
    assert dest.read_bytes() == b"plan bytes"
    assert ("builder", "create_network", (1 << 0,)) in calls  # STRONGLY_TYPED
    assert ("parser", "parse_from_file", (str(onnx),)) in calls
    assert [c for c in calls if c[1] == "set_flag"] == []
    assert [c for c in calls if c[1] == "clear_flag"] == ([("config", "clear_flag", (6,))] if precision == "fp32" else [])
    assert ("profile", "set_shape", ("PIXELS", (1, 3, 224, 224), (128, 3, 224, 224), (128, 3, 224, 224))) in calls
    assert next((tmp_path / "engines").glob("timing_*.cache")).read_bytes() == b"timing bytes"
    assert "trt11.1.0" in next((tmp_path / "engines").glob("resnet50_*.plan")).name


def test_python_builder_without_the_deprecated_strongly_typed_flag_passes_no_flags(monkeypatch, tmp_path, fake_onnx):
    import sys

    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(calls, strongly_typed_flag=False))
    engines._build_with_python(fake_onnx, tmp_path / "e.plan", _wanted(fake_onnx), tmp_path / "t.cache")
    assert ("builder", "create_network", (0,)) in calls


@pytest.mark.parametrize("version, ok", [("8.6.1", False), ("9.3.0", False), ("10.0.1", True), ("10.5.0", True), ("11.1.0", True)])
def test_tensorrt_older_than_10_is_refused(version, ok):
    if ok:
        engines.check_tensorrt_version(version)
    else:
        with pytest.raises(engines.TensorRTUnavailable, match="strongly typed"):
            engines.check_tensorrt_version(version)


def test_engine_refuses_an_onnx_file_made_for_another_precision(tmp_path, fake_onnx):
    builds = FakeBuilder()
    fake_onnx.with_suffix(".onnx.json").write_text(json.dumps({"weights": "random:0", "precision": "fp32"}))
    with pytest.raises(ValueError, match="is the fp32 ONNX file, but a fp16 engine"):
        _ensure(fake_onnx, tmp_path, builds)
    fake_onnx.with_suffix(".onnx.json").write_text(json.dumps({"precision": "fp16"}))
    assert _ensure(fake_onnx, tmp_path, builds).exists()


@pytest.fixture()
def no_tensorrt(monkeypatch, tmp_path):
    """A machine without TensorRT: no Python module, no trtexec on PATH or where the NGC images keep it."""
    import builtins

    real_import = builtins.__import__

    def no_tensorrt_import(name, *args, **kwargs):
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorrt_import)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(engines, "TRTEXEC_NGC", tmp_path / "no-trtexec")


def test_without_tensorrt_the_build_stops_with_how_to_get_it(no_tensorrt):
    with pytest.raises(engines.TensorRTUnavailable) as err:
        engines.find_builder()
    for hint in ("nvcr.io/nvidia/tritonserver:<yy.mm>-py3", "same <yy.mm> as the server", "/usr/src/tensorrt/bin/trtexec"):
        assert hint in str(err.value)
    assert "pip install tensorrt" not in str(err.value)


def test_engine_subcommand_exits_2_with_the_message_when_tensorrt_is_missing(no_tensorrt, tmp_path, caplog, fake_onnx):
    from tritonvision_server.build_engines import main

    fake_onnx.with_name("resnet50_fp16.onnx").write_bytes(b"fp16 onnx")
    assert main(["engine", "--onnx", str(fake_onnx), "--output", str(tmp_path / "repo")]) == 2
    assert "nvcr.io/nvidia/tritonserver" in caplog.text


def test_engine_build_takes_the_precision_specific_onnx(tmp_path, fake_onnx):
    from tritonvision_server.build_engines import build_engine, gpu_profile

    builds = FakeBuilder()
    int8 = fake_onnx.with_name("resnet50_int8.onnx")
    int8.write_bytes(b"int8 onnx")
    dest = build_engine(tmp_path / "repo", gpu_profile("int8"), onnx=fake_onnx, engine_dir=tmp_path / "engines",
                        builder=builds, gpu=builds.gpu, workspace_mib=2048)
    assert builds.onnx == [int8] and dest == tmp_path / "repo" / "resnet50" / "1" / "model.plan"
    assert json.loads(next((tmp_path / "engines").glob("*.json")).read_text())["engine"]["workspace_mib"] == 2048


@pytest.mark.gpu
def test_tensorrt_builds_a_loadable_fp16_engine(tmp_path, onnx_path):
    try:
        import tensorrt as trt
    except ImportError:
        pytest.skip("the TensorRT Python API is not importable here (run inside nvcr.io/nvidia/tensorrt:<yy.mm>-py3)")
    from tritonvision_server import precision

    fp16 = precision.make_fp16(onnx_path)
    dest = engines.ensure_engine(fp16, tmp_path / "model.plan", spec.GPU.engine, spec.GPU.resnet50.batching,
                                 engine_dir=tmp_path / "engines", builder="python")
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(dest.read_bytes())
    assert engine.get_tensor_dtype(spec.PIXELS("FP16").name) == trt.float16
    assert engine.get_tensor_dtype(spec.SCORES.name) == trt.float32
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
        # Triton records a batch's statistics just after it sends the responses: wait for them to land.
        end = time.monotonic() + 5
        while not (stats := client.get_inference_statistics(spec.VALIDATE).model_stats[0]).batch_stats:
            if time.monotonic() > end:
                break
            time.sleep(0.05)
    from PIL import Image

    for i in (0, 2):
        result, error = got[i]
        assert error is None
        # The decoded pixel count, which the batcher sums against preprocess's pixel budget.
        width, height = Image.open(io.BytesIO(uploads[i])).size
        assert result.as_numpy(spec.PIXEL_COUNT.name).tolist() == [[width * height]]
    for i, reason in ((1, "truncated JPEG"), (3, "not a supported image")):
        result, error = got[i]
        assert result is None and reason in error.message()
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert max(b.batch_size for b in stats.batch_stats) > 1, "the requests were not batched together"


def test_validate_refuses_a_webp_its_dali_would_decode_as_noise_and_nothing_else(validate_server, photos):
    # The gpu profile's DALI (NGC 26.02-26.06) decodes a WebP with an EXIF orientation into pixels of no
    # orientation (test_dali_versions.py shows it); a JPEG with one, or an upright WebP, is decoded right.
    import tritonclient.grpc as grpcclient
    from PIL import Image

    photo = Image.open(io.BytesIO(photos["coffee"])).convert("RGB")

    def encoded(fmt, orientation=None):
        buf = io.BytesIO()
        photo.save(buf, fmt, quality=90, exif=orientation_exif(orientation))
        return buf.getvalue()

    def verdict(data):
        inp = grpcclient.InferInput(spec.IMAGE.name, [1, len(data)], "UINT8")
        inp.set_data_from_numpy(np.frombuffer(data, np.uint8)[None])
        with grpcclient.InferenceServerClient(validate_server.grpc_url) as client:
            try:
                return client.infer(spec.VALIDATE, [inp]).as_numpy(spec.PIXEL_COUNT.name).tolist()
            except grpcclient.InferenceServerException as exc:
                return exc

    for data in (encoded("WEBP"), encoded("WEBP", 1), encoded("JPEG", 6)):
        assert verdict(data) == [[photo.width * photo.height]]
    for orientation in (3, 6, 8):
        refused = verdict(encoded("WEBP", orientation))
        assert isinstance(refused, Exception) and refused.status() == "StatusCode.INVALID_ARGUMENT"
        assert refused.message().startswith(spec.refusal_message("header", ""))
        assert f"EXIF orientation ({orientation})" in refused.message()
