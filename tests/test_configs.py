"""The generated configs: valid for Triton's schema, faithful to the spec, and the committed ones up to date."""

from __future__ import annotations

from pathlib import Path

import pytest

from tritonvision import spec
from tritonvision_server import configs

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "model_repository"


@pytest.mark.parametrize("profile", list(spec.PROFILES.values()), ids=list(spec.PROFILES))
def test_every_generated_config_parses_with_tritons_schema(profile):
    for name, text in configs.render(profile).items():
        parsed = configs.parse(text)
        assert parsed.name == name
        assert parsed == configs.configs(profile)[name]


def test_committed_gpu_repository_equals_generator_output(tmp_path):
    configs.write_repository(spec.GPU, tmp_path)
    generated = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    for rel in generated:
        committed = COMMITTED / rel
        assert committed.exists(), f"{rel} is generated but not committed: run `python build_engines.py configs`"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), (
            f"model_repository/{rel} differs from the generator: run `python build_engines.py configs`"
        )
    for committed in COMMITTED.rglob("config.pbtxt"):
        assert committed.relative_to(COMMITTED) in generated, f"{committed} is committed but no longer generated"


@pytest.mark.parametrize("profile", list(spec.PROFILES.values()), ids=list(spec.PROFILES))
def test_configs_carry_the_spec_values(profile):
    cfg = configs.configs(profile)
    ens, pre, net = cfg[spec.ENSEMBLE], cfg[spec.PREPROCESS], cfg[spec.RESNET50]
    assert [i.name for i in ens.input] == [spec.IMAGE.name] and [o.name for o in ens.output] == [spec.SCORES.name]
    assert ens.output[0].label_filename == configs.LABELS_FILE
    assert list(ens.output[0].dims) == [spec.NUM_CLASSES]
    assert pre.input[0].allow_ragged_batch, "encoded images differ in length: batching needs ragged inputs"
    assert list(pre.output[0].dims) == [3, spec.PREPROCESSING.crop, spec.PREPROCESSING.crop]
    assert pre.output[0].data_type == net.input[0].data_type
    for model, serving in ((pre, profile.preprocess), (net, profile.resnet50)):
        assert model.max_batch_size == serving.batching.max_batch_size
        assert list(model.dynamic_batching.preferred_batch_size) == list(serving.batching.preferred_batch_sizes)
        assert model.dynamic_batching.max_queue_delay_microseconds == serving.batching.max_queue_delay_us
        assert model.instance_group[0].count == serving.instances
    assert ens.max_batch_size <= min(pre.max_batch_size, net.max_batch_size)


def test_committed_labels_are_torchvisions_imagenet_classes():
    from torchvision.models import ResNet50_Weights

    lines = (COMMITTED / spec.ENSEMBLE / configs.LABELS_FILE).read_text().splitlines()
    assert len(lines) == spec.NUM_CLASSES
    # The list shipped in the package (read without torchvision) is torchvision's, in its order.
    assert lines == configs.labels() == list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
    assert lines[281] == "tabby"


def test_cpu_repository_has_model_code_and_onnx(cpu_repository):
    for step in (spec.PREPROCESS, spec.RESNET50):
        stub = (cpu_repository / step / "1" / "model.py").read_text()
        assert f"tritonvision_server.backends.{step}" in stub
    assert (cpu_repository / spec.RESNET50 / "1" / configs.ONNX_FILE).stat().st_size > 50_000_000
    assert configs.parse((cpu_repository / spec.PREPROCESS / "config.pbtxt").read_text()).backend == "python"


def test_cpu_resnet50_runs_small_batches_spinning_and_large_ones_sleeping(cpu_repository, onnx_path):
    import numpy as np

    from tritonvision_server.ort import OnnxRunner

    cfg = configs.parse((cpu_repository / spec.RESNET50 / "config.pbtxt").read_text())
    limit = int(cfg.parameters["spin_max_batch"].string_value)
    assert limit == spec.CPU.ort_spin_max_batch >= 1
    run = OnnxRunner(onnx_path, intra_op_threads=spec.CPU.cpu_threads, spin_max_batch=limit)
    assert run.session_for(1) is run.spinning and run.session_for(limit) is run.spinning
    assert run.session_for(limit + 1) is run.sleeping
    # The two sessions are the same network: a batch gives the same scores through either.
    x = np.random.default_rng(0).standard_normal((limit + 1, 3, 224, 224), dtype=np.float32)
    assert np.allclose(run(x)[:1], run(x[:1]), atol=1e-5)
    sleeping_only = OnnxRunner(onnx_path, intra_op_threads=1, spin_max_batch=0)
    assert sleeping_only.spinning is None and sleeping_only.session_for(1) is sleeping_only.sleeping


def test_each_step_runs_on_the_backend_its_spec_names():
    from dataclasses import replace

    assert configs.preprocess_config(spec.GPU).backend == spec.GPU.preprocess.backend == "dali"
    assert configs.resnet50_config(spec.GPU).platform == spec.GPU.resnet50.backend == "tensorrt_plan"
    assert configs.resnet50_config(spec.CPU).backend == spec.CPU.resnet50.backend == "python"
    # The backend is data: a gpu profile whose model step runs the ONNX file in the python backend.
    hybrid = replace(spec.GPU, resnet50=replace(spec.GPU.resnet50, backend="python"))
    cfg = configs.resnet50_config(hybrid)
    assert cfg.backend == "python" and not cfg.platform and cfg.parameters["onnx_file"].string_value == configs.ONNX_FILE
    with pytest.raises(ValueError, match="backend must be one of"):
        replace(spec.GPU.resnet50, backend="onnxruntime")
    with pytest.raises(ValueError, match="cannot run on the tensorrt_plan backend"):
        configs.preprocess_config(replace(spec.GPU, preprocess=replace(spec.GPU.preprocess, backend="tensorrt_plan")))


def test_image_file_suffixes_follow_the_accepted_formats():
    from dataclasses import replace

    assert spec.image_suffixes() >= {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
    assert spec.image_suffixes(replace(spec.IMAGE_LIMITS, formats=("png",))) == {".png"}


@pytest.mark.parametrize("profile", [spec.GPU, spec.GPU_TORCH], ids=lambda p: p.name)
def test_every_bounded_step_of_a_gpu_profile_has_a_second_instance_to_wake_the_batcher(profile):
    # With a queue policy Triton's batcher can miss the wake-up of a lone instance and sleep 500 ms
    # (spec.Batching.has_queue_policy; benchmarks/queue_stall.py): on a GPU that is hundreds of batches.
    steps = [getattr(profile, name) for name in ("validate", "preprocess", "resnet50") if getattr(profile, name, None)]
    assert steps
    for step in steps:
        assert not step.batching.has_queue_policy or step.instances >= 2, step


@pytest.mark.parametrize("profile", [spec.CPU, spec.GPU_TORCH, spec.GPU_TORCH.on_cpu()], ids=["cpu", "gpu-torch", "gpu-torch-cpu"])
def test_admission_is_generated_and_a_lone_resnet50_behind_it_has_no_queue_policy(profile):
    # Admission holds back enqueues to resnet50, the batcher's reliable wake-up: with a queue policy a lone
    # instance then sleeps 500 ms before nearly every batch (measured: resnet50 queue time 527 ms).
    params = configs.configs(profile)[spec.PREPROCESS].parameters
    assert params["admission_model"].string_value == spec.RESNET50
    assert int(params["admission_limit"].string_value) == profile.admission_limit >= profile.preprocess.batching.max_batch_size
    assert int(params["admission_max_wait_us"].string_value) == profile.preprocess.batching.queue_timeout_us > 0
    if profile.resnet50.instances == 1:
        assert not profile.resnet50.batching.has_queue_policy
    assert "admission_limit" not in configs.configs(spec.GPU)[spec.PREPROCESS].parameters  # DALI has no such code


def test_the_light_variant_has_two_instances_a_step_unless_a_sweep_sets_them(tmp_path):
    from tritonvision_server.configs import write_light_repository

    for min_instances, expected in ((2, 2), (1, 1)):
        repo = write_light_repository(tmp_path / str(min_instances), min_instances=min_instances)
        for step in (spec.PREPROCESS, spec.RESNET50):
            from google.protobuf import text_format
            from tritonclient.grpc import model_config_pb2

            config = text_format.Parse((repo / step / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
            assert config.instance_group[0].count == expected


def test_the_cpu_steps_warm_up_with_a_full_batch_and_the_repository_holds_its_photo(tmp_path):
    # What a full batch needs (ONNX Runtime's buffers, the region pages it touches) is taken at load, not
    # in the first burst of traffic (README, Overload: memory).
    from tritonvision_server.configs import write_repository
    from tritonvision_server.repocheck import check_repository

    generated = configs.configs(spec.CPU)
    for step in (spec.PREPROCESS, spec.RESNET50):
        (warmup,) = generated[step].model_warmup
        assert warmup.batch_size == generated[step].max_batch_size == spec.CPU.max_batch_size
    (pixels,) = generated[spec.RESNET50].model_warmup[0].inputs.values()
    assert pixels.zero_data and list(pixels.dims) == list(spec.CPU.pixels.dims)
    repo = write_repository(spec.CPU, tmp_path / "cpu")
    assert (repo / spec.PREPROCESS / configs.WARMUP_FILE).is_file()
    assert not (repo / spec.PREPROCESS / configs.WARMUP_LARGE_FILE).exists()
    assert check_repository(repo, profile=spec.CPU) == []
    assert not configs.configs(spec.GPU_TORCH)[spec.RESNET50].model_warmup  # CUDA graphs are its warm-up
