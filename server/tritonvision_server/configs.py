"""Generate the model repository of either profile from :mod:`tritonvision.spec` through Triton's schema.

Each ``config.pbtxt`` is built as a ``model_config_pb2.ModelConfig`` message and printed with
``text_format``, so a field that Triton does not know cannot be written and every file parses.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from importlib import resources
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tritonvision import sample_images, spec
from tritonvision.spec import ENSEMBLE, IMAGE, PIXEL_COUNT, PREPROCESS, RESNET50, SCORES, VALIDATE, Profile

from .batchstrategy import BATCH_PIXELS_PARAMETER, REQUEST_PIXELS_PARAMETER

log = logging.getLogger(__name__)

LABELS_FILE = "labels.txt"
ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"
# gpu-torch: ResNet-50's state dict, from the same weights as the ONNX file (onnx_export.export_state_dict).
TORCH_WEIGHTS_FILE = "model.pt"
# The DALI backend autoserialises this Python file with the server's own DALI (see pipeline.dali_model_source).
DALI_FILE = "dali.py"
# Real photos shipped in the packages: DALI cannot warm up on random bytes. Triton reads warm-up data from
# <model>/warmup/<file>, and a variable-length input needs the file's exact byte count as its dims. The
# small one compiles the decoder paths at batch 1 and max batch; the 12-megapixel one (4032x3024, a phone
# photo) makes the decoder allocate the buffers that real uploads need before the first one arrives.
WARMUP_FILE = "warmup/photo.jpg"
WARMUP_SOURCE = next(p for p in sample_images() if p.name == "chelsea.jpg")
WARMUP_LARGE_FILE = "warmup/photo_12mp.jpg"
WARMUP_LARGE_SOURCE = Path(str(resources.files(__package__).joinpath("data", "warmup_12mp.jpg")))
# The 1000 ImageNet class names in torchvision's order, shipped so that no build step needs torchvision.
LABELS_SOURCE = Path(str(resources.files(__package__).joinpath("data", "imagenet_labels.txt")))

_DTYPES = {"UINT8": mc.TYPE_UINT8, "INT64": mc.TYPE_INT64, "FP16": mc.TYPE_FP16, "FP32": mc.TYPE_FP32,
           "BYTES": mc.TYPE_STRING}
_KINDS = {"KIND_CPU": mc.ModelInstanceGroup.KIND_CPU, "KIND_GPU": mc.ModelInstanceGroup.KIND_GPU}


def _header(profile: Profile, model: str) -> str:
    return (
        f"# Generated for the {profile.name} profile by `build_engines.py configs` from tritonvision/spec.py\n"
        f"# (server/tritonvision_server/configs.py). Do not edit: change the spec and regenerate.\n"
        f"# Model: {model}\n"
    )


def _input(tensor: spec.Tensor, *, ragged: bool = False) -> mc.ModelInput:
    return mc.ModelInput(name=tensor.name, data_type=_DTYPES[tensor.dtype], dims=list(tensor.dims), allow_ragged_batch=ragged)


def _output(tensor: spec.Tensor, *, labels: bool = False) -> mc.ModelOutput:
    return mc.ModelOutput(
        name=tensor.name, data_type=_DTYPES[tensor.dtype], dims=list(tensor.dims), label_filename=LABELS_FILE if labels else ""
    )


def _serving(config: mc.ModelConfig, serving: spec.StepServing) -> None:
    b = serving.batching
    config.max_batch_size = b.max_batch_size
    config.instance_group.append(mc.ModelInstanceGroup(count=serving.instances, kind=_KINDS[serving.kind]))
    config.dynamic_batching.preferred_batch_size.extend(b.preferred_batch_sizes)
    config.dynamic_batching.max_queue_delay_microseconds = b.max_queue_delay_us
    if b.max_queue_size or b.queue_timeout_us:
        # allow_timeout_override: Triton 2.51 then uses a request's own timeout when it is shorter.
        config.dynamic_batching.default_queue_policy.CopyFrom(mc.ModelQueuePolicy(
            timeout_action=mc.ModelQueuePolicy.REJECT, default_timeout_microseconds=b.queue_timeout_us,
            allow_timeout_override=True, max_queue_size=b.max_queue_size,
        ))


def _parameters(config: mc.ModelConfig, **params) -> None:
    for key, value in params.items():
        config.parameters[key].string_value = str(value)


def preprocess_config(profile: Profile) -> mc.ModelConfig:
    config = mc.ModelConfig(name=PREPROCESS)
    # Ragged batching lets requests whose encoded images differ in length share one batch.
    config.input.append(_input(IMAGE, ragged=True))
    if profile.validate is not None:
        config.input.append(_input(PIXEL_COUNT))
    config.output.append(_output(profile.pixels))
    _serving(config, profile.preprocess)
    config.backend = profile.preprocess.backend
    if profile.validate is not None and profile.max_batch_pixels:
        # Read by the batching strategy (batchstrategy/pixel_budget.c); the DALI backend ignores parameters
        # it does not know (dali_backend r24.10 to r26.06 looks up num_threads and split_along_outer_axis only).
        _parameters(config, **{BATCH_PIXELS_PARAMETER: profile.max_batch_pixels})
    if profile.preprocess.backend == "python" and profile.torch_device is not None:
        # The encoded bytes must be in host memory for nvJPEG (and the header check): keep the python
        # backend's default of moving inputs to the CPU (a client's CUDA shared memory input lands there too).
        _parameters(config, num_threads=profile.cpu_threads, device=profile.torch_device,
                    FORCE_CPU_ONLY_INPUT_TENSORS="yes")
    elif profile.preprocess.backend == "python":
        _parameters(config, num_threads=profile.cpu_threads)
    elif profile.preprocess.backend == "dali":
        # Named explicitly so that a stale serialised model.dali left in the folder is never loaded instead.
        config.default_model_filename = DALI_FILE
        _parameters(config, num_threads=profile.cpu_threads)
        # Batch 1 compiles the decoder paths; the max batch makes DALI allocate its batch-wide buffers, and
        # the 12-megapixel photo the per-image decode buffers, at load time rather than under the first
        # burst of traffic.
        counted = profile.validate is not None
        for batch_size in sorted({1, profile.preprocess.batching.max_batch_size}):
            config.model_warmup.append(_warmup(batch_size, WARMUP_SOURCE, WARMUP_FILE, counted=counted))
        config.model_warmup.append(_warmup(1, WARMUP_LARGE_SOURCE, WARMUP_LARGE_FILE, name="photo_12mp_batch1",
                                           counted=counted))
    else:
        raise ValueError(f"preprocess cannot run on the {profile.preprocess.backend} backend")
    if profile.warmup_full_batch and profile.preprocess.backend == "python":
        config.model_warmup.append(_warmup(profile.preprocess.batching.max_batch_size, WARMUP_SOURCE, WARMUP_FILE))
    if profile.admission_limit:
        # Read by backends/_common.admission; the metrics URL comes from the launcher at start.
        _parameters(config, admission_model=RESNET50, admission_limit=profile.admission_limit,
                    admission_max_wait_us=profile.preprocess.batching.queue_timeout_us)
    return config


def validate_config(profile: Profile) -> mc.ModelConfig:
    """The gpu profile's header check ahead of DALI (see :mod:`.backends.validate`)."""
    assert profile.validate is not None
    config = mc.ModelConfig(name=VALIDATE, backend="python")
    config.input.append(_input(IMAGE, ragged=True))
    config.output.append(_output(PIXEL_COUNT))
    _serving(config, profile.validate)
    if profile.max_batch_pixels:
        _parameters(config, **{REQUEST_PIXELS_PARAMETER: profile.max_batch_pixels})
    return config


def resnet50_config(profile: Profile) -> mc.ModelConfig:
    config = mc.ModelConfig(name=RESNET50)
    config.input.append(_input(profile.pixels))
    config.output.append(_output(SCORES, labels=True))
    _serving(config, profile.resnet50)
    if profile.resnet50.backend == "python" and profile.torch_device is not None:
        config.backend = "python"
        # FORCE_CPU_ONLY_INPUT_TENSORS "no": PIXELS stay where preprocess left them (GPU memory, handed over
        # through DLPack) instead of being copied to the host and back (python_backend r24.10 README).
        _parameters(config, weights_file=TORCH_WEIGHTS_FILE, device=profile.torch_device,
                    precision=profile.torch_precision,
                    cuda_graph_batch_sizes=",".join(map(str, profile.cuda_graph_batch_sizes)),
                    FORCE_CPU_ONLY_INPUT_TENSORS="no")
    elif profile.resnet50.backend == "python":
        config.backend = "python"
        _parameters(config, onnx_file=ONNX_FILE, intra_op_threads=profile.cpu_threads, spin_max_batch=profile.ort_spin_max_batch)
    elif profile.resnet50.backend == "tensorrt_plan":
        config.platform = "tensorrt_plan"
        config.default_model_filename = PLAN_FILE
        if profile.cuda_graph_batch_sizes:
            cuda = config.optimization.cuda
            cuda.graphs = True
            cuda.graph_spec.extend(graph_specs(profile.cuda_graph_batch_sizes, config.input))
    else:
        raise ValueError(f"resnet50 cannot run on the {profile.resnet50.backend} backend")
    if profile.warmup_full_batch and profile.resnet50.backend == "python":
        pixels = profile.pixels
        config.model_warmup.append(mc.ModelWarmup(
            name=f"zeros_batch{profile.resnet50.batching.max_batch_size}",
            batch_size=profile.resnet50.batching.max_batch_size,
            inputs={pixels.name: mc.ModelWarmup.Input(data_type=mc.DataType.Value(f"TYPE_{pixels.dtype}"),
                                                      dims=list(pixels.dims), zero_data=True)}))
    return config


# The python backend's per-instance region starts at this size (its shm-default-byte-size, 1 MiB) and grows
# on demand; the headroom is for the stubs' control structures and anything else in the pod's /dev/shm.
PYTHON_BACKEND_REGION_BYTES = 1 << 20
SHM_HEADROOM_BYTES = 256 << 20


def shm_bytes(profile: Profile, upload_bytes: int) -> int:
    """/dev/shm that ``profile``'s python-backend steps need when every image of a full dynamic batch on every
    instance is ``upload_bytes`` long: the stub receives a whole batch's inputs in its shared-memory region.

    In the gpu profile that is ``validate`` (its output is one byte); DALI and TensorRT exchange tensors
    through Triton's own (device and pinned) memory. A memory-backed emptyDir of this size keeps the pod from
    being evicted: past it, a batch fails to allocate (ENOSPC) instead.
    """
    pixels = 3 * spec.PREPROCESSING.crop ** 2 * (2 if profile.pixels_dtype == "FP16" else 4)
    if profile.validate is not None:
        steps = [(profile.validate, upload_bytes + 1)]
    else:  # cpu profile: both steps are python models
        steps = [(profile.preprocess, upload_bytes + pixels), (profile.resnet50, pixels + 4 * spec.NUM_CLASSES)]
    total = sum(s.instances * (s.batching.max_batch_size * per_image + PYTHON_BACKEND_REGION_BYTES) for s, per_image in steps)
    return total + SHM_HEADROOM_BYTES


def graph_specs(batch_sizes, inputs=()) -> list[mc.ModelOptimizationPolicy.Cuda.GraphSpec]:
    """CUDA graphs that cover every batch size from 1 to the largest one captured.

    The TensorRT backend runs a graph only for the exact batch size it was captured at, unless its spec has
    a ``graph_lower_bound``: then any batch from that bound up to the graph's size runs the graph, padded.
    Each graph's bound is one more than the next smaller graph, so every dynamic batch runs the smallest
    graph that holds it (tensorrt_backend ``FindClosestCudaGraph``).

    The bound works only when the spec and its bound also give each input's shape (``inputs``: the model's
    inputs, whose dims are concrete): without them the backend builds the bound's key from the graph's own
    input shape, batch size included, and a smaller batch never matches it (tensorrt_backend r24.10 to
    r26.06, ``SetCudaGraphShape``; the server's ``qa/L0_cuda_graph`` expects exactly that: a bound without
    shapes runs only the graph's own size).
    """
    specs, previous = [], 0
    for size in sorted(set(batch_sizes)):
        spec_ = mc.ModelOptimizationPolicy.Cuda.GraphSpec(batch_size=size)
        spec_.graph_lower_bound.batch_size = previous + 1
        for tensor in inputs:
            if any(d < 0 for d in tensor.dims):
                raise ValueError(f"a CUDA graph needs the concrete shape of input {tensor.name}, got {list(tensor.dims)}")
            spec_.input[tensor.name].dim.extend(tensor.dims)
            spec_.graph_lower_bound.input[tensor.name].dim.extend(tensor.dims)
        specs.append(spec_)
        previous = size
    return specs


def ensemble_config(profile: Profile) -> mc.ModelConfig:
    config = mc.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=profile.max_batch_size)
    config.input.append(_input(IMAGE))
    config.output.append(_output(SCORES, labels=True))
    pixels = profile.pixels.name
    preprocess_inputs = {IMAGE.name: IMAGE.name}
    if profile.validate is not None:
        config.ensemble_scheduling.step.append(
            mc.ModelEnsembling.Step(
                model_name=VALIDATE, model_version=-1, input_map={IMAGE.name: IMAGE.name},
                output_map={PIXEL_COUNT.name: "pixel_count"},
            )
        )
        # preprocess needs validate's pixel counts, so it runs only for images validate let through.
        preprocess_inputs[PIXEL_COUNT.name] = "pixel_count"
    config.ensemble_scheduling.step.extend(
        [
            mc.ModelEnsembling.Step(
                model_name=PREPROCESS, model_version=-1, input_map=preprocess_inputs, output_map={pixels: "pixels"}
            ),
            mc.ModelEnsembling.Step(
                model_name=RESNET50, model_version=-1, input_map={pixels: "pixels"}, output_map={SCORES.name: SCORES.name}
            ),
        ]
    )
    return config


def _shipped(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package; reinstall tritonvision")
    return path


def _warmup(batch_size: int, source: Path, file: str, name: str | None = None, counted: bool = False) -> mc.ModelWarmup:
    size = _shipped(source).stat().st_size
    inputs = {IMAGE.name: mc.ModelWarmup.Input(data_type=mc.TYPE_UINT8, dims=[size], input_data_file=Path(file).name)}
    if counted:
        # The count's value does not matter to DALI, only that it is fed; warm-up requests go straight to an
        # instance, not through the batcher and its pixel budget.
        inputs[PIXEL_COUNT.name] = mc.ModelWarmup.Input(data_type=_DTYPES[PIXEL_COUNT.dtype],
                                                        dims=list(PIXEL_COUNT.dims), zero_data=True)
    return mc.ModelWarmup(name=name or f"photo_batch{batch_size}", batch_size=batch_size, inputs=inputs)


def configs(profile: Profile) -> dict[str, mc.ModelConfig]:
    models = {ENSEMBLE: ensemble_config(profile), PREPROCESS: preprocess_config(profile), RESNET50: resnet50_config(profile)}
    if profile.validate is not None:
        models[VALIDATE] = validate_config(profile)
    return models


def render(profile: Profile) -> dict[str, str]:
    """``config.pbtxt`` text of each model, keyed by model name."""
    return {name: _header(profile, name) + text_format.MessageToString(cfg) for name, cfg in configs(profile).items()}


def parse(text: str) -> mc.ModelConfig:
    """Parse a ``config.pbtxt`` with Triton's schema (comments allowed); raises ``text_format.ParseError``."""
    return text_format.Parse(text, mc.ModelConfig())


def labels() -> list[str]:
    """The 1000 ImageNet class names in torchvision's order (shipped with the package; a test checks them)."""
    return _shipped(LABELS_SOURCE).read_text(encoding="utf-8").splitlines()


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write_models(dest: Path, profile: Profile, models: dict[str, mc.ModelConfig], label_names: list[str]) -> None:
    """Each model's folder, version folder and ``config.pbtxt`` (``models``: :func:`configs` of ``profile``,
    possibly edited), and the labels of the models that answer with classes."""
    label_text = "\n".join(label_names) + "\n"
    for name, cfg in models.items():
        (dest / name / "1").mkdir(parents=True, exist_ok=True)
        (dest / name / "config.pbtxt").write_text(_header(profile, name) + text_format.MessageToString(cfg))
    for name in (ENSEMBLE, RESNET50):
        (dest / name / LABELS_FILE).write_text(label_text)


_BACKEND_STUB = '''# Generated by tritonvision_server.configs: the model's code is {module}.
from {module} import TritonPythonModel  # noqa: F401
'''


def write_repository(profile: Profile, dest: Path, *, onnx_path: Path | None = None, label_names: list[str] | None = None,
                     torch_weights: Path | None = None) -> Path:
    """Write ``dest`` as a model repository of ``profile`` (configs, labels, python-backend model code, and the
    ONNX file (cpu) or ResNet-50 state dict (gpu-torch) when given)."""
    dest = Path(dest)
    _write_models(dest, profile, configs(profile), label_names if label_names is not None else labels())
    steps = {PREPROCESS: profile.preprocess, RESNET50: profile.resnet50}
    if profile.validate is not None:
        steps[VALIDATE] = profile.validate
    for name, step in steps.items():
        if step.backend == "python":
            # gpu-torch's steps are PyTorch models of their own (backends/torch_*.py).
            prefix = "torch_" if profile.torch_device is not None and name != VALIDATE else ""
            module = f"tritonvision_server.backends.{prefix}{name}"
            (dest / name / "1" / "model.py").write_text(_BACKEND_STUB.format(module=module))
    if profile.resnet50.backend == "python" and onnx_path is not None:
        _link_or_copy(Path(onnx_path), dest / RESNET50 / "1" / ONNX_FILE)
    if profile.torch_device is not None and torch_weights is not None:
        _link_or_copy(Path(torch_weights), dest / RESNET50 / "1" / TORCH_WEIGHTS_FILE)
    if profile.resnet50.backend == "tensorrt_plan":
        # Version folders whose content is built on the GPU host (model.plan) or that stay empty (the
        # ensemble) still have to exist for Triton; git keeps them through a placeholder.
        for name in (ENSEMBLE, RESNET50):
            (dest / name / "1" / ".gitkeep").touch()
    if profile.preprocess.backend == "dali":
        from .pipeline import dali_model_source

        (dest / PREPROCESS / "1" / DALI_FILE).write_text(dali_model_source(profile))
        (dest / PREPROCESS / "1" / ".gitkeep").unlink(missing_ok=True)
    warmups = {d.input_data_file for w in configs(profile)[PREPROCESS].model_warmup for d in w.inputs.values()}
    for source, file in ((WARMUP_SOURCE, WARMUP_FILE), (WARMUP_LARGE_SOURCE, WARMUP_LARGE_FILE)):
        if Path(file).name in warmups:
            warmup = dest / PREPROCESS / file
            warmup.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_shipped(source), warmup)
    log.info("wrote the %s model repository to %s", profile.name, dest)
    return dest


_LIGHT_STUB = """# The light variant (configs.write_light_repository): trivial compute, the same interface.
from tritonvision_server.backends.light import {cls} as TritonPythonModel  # noqa: F401
"""


def write_light_repository(dest: Path, profile: Profile | None = None, *, min_instances: int = 2) -> Path:
    """The cpu-profile repository with both steps swapped for :mod:`.backends.light` (trivial compute,
    same configs and interface, at least ``min_instances`` instances a step): the server answers about as
    fast as a GPU would make the model look, so client and transport costs show in benchmarks and load
    tests. Labels are placeholders."""
    from dataclasses import replace

    from tritonvision import spec

    profile = profile or spec.CPU
    # Two instances a step: with bounded queues one instance of a model this fast leaves the batcher asleep
    # for 500 ms several times a second (spec.Batching.has_queue_policy), which would be all a benchmark saw.
    profile = replace(profile, **{step: replace(getattr(profile, step), instances=max(min_instances, getattr(profile, step).instances))
                                  for step in (PREPROCESS, RESNET50)})
    dest = write_repository(profile, Path(dest), onnx_path=None, label_names=[f"class_{i}" for i in range(spec.NUM_CLASSES)])
    (dest / PREPROCESS / "1" / "model.py").write_text(_LIGHT_STUB.format(cls="LightPreprocess"))
    (dest / RESNET50 / "1" / "model.py").write_text(_LIGHT_STUB.format(cls="LightResNet50"))
    return dest


_RECORDER_STUB = """# The batch recorder (configs.write_batch_recorder_repository): a stand-in for the DALI preprocess step.
from tritonvision_server.backends.batch_recorder import BatchRecorder as TritonPythonModel  # noqa: F401
"""
BATCH_LOG_FILE = "batches.jsonl"


def write_batch_recorder_repository(dest: Path, *, library: Path | None = None, execute_seconds: float = 0.3,
                                    queue_timeout_us: int = 60_000_000) -> Path:
    """The gpu profile's ensemble on the bundled server, for the pixel budget: the real ``validate`` (one
    instance), :mod:`.backends.batch_recorder` as ``preprocess`` with the generated config (backend switched
    to python, CPU instances, no DALI warm-up; it logs each batch's pixel counts to ``dest/batches.jsonl``),
    and :mod:`.backends.light`'s ResNet-50 (one instance). ``library``: the compiled batching strategy, put
    where Triton finds it (None: served without it). Each step's queue timeout is ``queue_timeout_us``: two
    shared cores run all of it, and a GPU host's timeout would refuse what merely waits."""
    from .batchstrategy import library_path

    dest = Path(dest)
    profile = spec.GPU
    models = configs(profile)
    pre, resnet, validate = models[PREPROCESS], models[RESNET50], models[VALIDATE]
    pre.backend = "python"
    pre.ClearField("default_model_filename")
    del pre.model_warmup[:]
    _parameters(pre, batch_log=dest / BATCH_LOG_FILE, execute_seconds=execute_seconds)
    resnet.ClearField("platform")
    resnet.ClearField("default_model_filename")
    resnet.ClearField("optimization")
    resnet.backend = "python"
    for step in (pre, resnet, validate):
        step.instance_group[0].kind = mc.ModelInstanceGroup.KIND_CPU
        step.dynamic_batching.default_queue_policy.default_timeout_microseconds = queue_timeout_us
    resnet.instance_group[0].count = validate.instance_group[0].count = 1
    _write_models(dest, profile, models, [f"class_{i}" for i in range(spec.NUM_CLASSES)])
    (dest / VALIDATE / "1" / "model.py").write_text(_BACKEND_STUB.format(module="tritonvision_server.backends.validate"))
    (dest / RESNET50 / "1" / "model.py").write_text(_LIGHT_STUB.format(cls="LightResNet50"))
    (dest / PREPROCESS / "1" / "model.py").write_text(_RECORDER_STUB)
    lib = library_path(dest)
    if library is not None:
        shutil.copyfile(library, lib)
    else:
        lib.unlink(missing_ok=True)
    return dest


def read_batch_log(repository: Path, *, clear: bool = True) -> list[list[int]]:
    """The batches the recorder ran (each: the pixel count of each of its requests), and the log cleared."""
    log_file = Path(repository) / BATCH_LOG_FILE
    lines = log_file.read_text().splitlines() if log_file.exists() else []
    if clear:
        log_file.write_text("")
    return [json.loads(line) for line in lines]
