"""Check a model repository for what Triton refuses at load time and what users trip over at run time.

Rules (each problem names its rule, so tests can ask for a broken variant of each):

- ``parse``       every ``config.pbtxt`` parses with Triton's schema; its name matches the directory
- ``wiring``      ensemble steps use existing models, map existing inputs/outputs, and every tensor they
                  read is an ensemble input or an earlier step's output, with matching dtype and dims;
                  every step output is read by a later step or is an ensemble output
- ``batch``       every step model batches at least as much as the ensemble
- ``preferred``   preferred batch sizes are within 1..max_batch_size and inside the engine's profiles;
                  CUDA-graph batch sizes likewise
- ``graphs``      CUDA graphs, with their lower bounds, run every batch size 1..max_batch_size (the TensorRT
                  backend runs a graph only for batches between its ``graph_lower_bound`` and its size, and
                  only when the spec and the bound give every input's shape: otherwise for its size alone)
- ``ragged``      a variable-length input of a dynamically batched model allows ragged batching
- ``labels``      a ``label_filename`` exists with one line per class of its output
- ``warmup``      a warm-up file exists at ``<model>/warmup/<file>`` and its dims are concrete and match it
- ``artifact``    (``require_artifacts``) the model file each backend loads exists
- ``batcher``     a model whose config gives a pixel budget (``max_batch_pixels``) has it as a positive
                  integer and, with ``require_artifacts``, the batching strategy that enforces it
                  (``batchstrategy.so``, ``build_engines.py batcher``): without the library Triton loads the
                  model all the same and batches without a budget; a library without the parameter fails the
                  model's load
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tritonvision import spec

from .batchstrategy import BATCH_PIXELS_PARAMETER, BATCH_STRATEGY_FILE

_DTYPE_SIZES = {mc.TYPE_UINT8: 1, mc.TYPE_INT8: 1, mc.TYPE_FP16: 2, mc.TYPE_FP32: 4, mc.TYPE_INT32: 4, mc.TYPE_INT64: 8}


@dataclass(frozen=True)
class Problem:
    rule: str
    model: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.model}: {self.message}"


def _dtype(value: int) -> str:
    return mc.DataType.Name(value)


def _dims_compatible(a, b) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b))


def load_configs(repository: Path) -> tuple[dict[str, mc.ModelConfig], list[Problem]]:
    configs, problems = {}, []
    for path in sorted(Path(repository).glob("*/config.pbtxt")):
        model = path.parent.name
        try:
            cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
        except text_format.ParseError as exc:
            problems.append(Problem("parse", model, f"config.pbtxt does not parse: {exc}"))
            continue
        if cfg.name and cfg.name != model:
            problems.append(Problem("parse", model, f"config name {cfg.name!r} differs from its directory {model!r}"))
        if not cfg.backend and not cfg.platform:
            problems.append(Problem("parse", model, "neither backend nor platform is set"))
        configs[model] = cfg
    if not configs and not problems:
        problems.append(Problem("parse", str(repository), "no */config.pbtxt found"))
    return configs, problems


def _check_ensemble(name: str, ens: mc.ModelConfig, configs: dict[str, mc.ModelConfig]) -> list[Problem]:
    problems = []
    # tensor name in the ensemble -> (dtype, dims, producer)
    available = {t.name: (t.data_type, list(t.dims), "ensemble input") for t in ens.input}
    consumed = {t.name for t in ens.output}
    for i, step in enumerate(ens.ensemble_scheduling.step):
        consumed.update(step.input_map.values())
        where = f"step {i} ({step.model_name})"
        model = configs.get(step.model_name)
        if model is None:
            problems.append(Problem("wiring", name, f"{where}: no model {step.model_name!r} in the repository"))
            continue
        inputs = {t.name: t for t in model.input}
        outputs = {t.name: t for t in model.output}
        for model_input, tensor in step.input_map.items():
            if model_input not in inputs:
                problems.append(Problem("wiring", name, f"{where}: {step.model_name} has no input {model_input!r}"))
                continue
            if tensor not in available:
                problems.append(Problem("wiring", name, f"{where}: reads {tensor!r}, which no earlier step produces"))
                continue
            dtype, dims, producer = available[tensor]
            want = inputs[model_input]
            if dtype != want.data_type:
                problems.append(Problem("wiring", name, f"{where}: {tensor!r} is {_dtype(dtype)} from {producer}, "
                                                        f"but {step.model_name}.{model_input} takes {_dtype(want.data_type)}"))
            if not _dims_compatible(dims, list(want.dims)):
                problems.append(Problem("wiring", name, f"{where}: {tensor!r} has dims {dims} from {producer}, "
                                                        f"but {step.model_name}.{model_input} takes {list(want.dims)}"))
        for t in model.input:
            if t.name not in step.input_map and not t.optional:
                problems.append(Problem("wiring", name, f"{where}: input {t.name!r} of {step.model_name} is not mapped"))
        for model_output, tensor in step.output_map.items():
            if model_output not in outputs:
                problems.append(Problem("wiring", name, f"{where}: {step.model_name} has no output {model_output!r}"))
                continue
            out = outputs[model_output]
            available[tensor] = (out.data_type, list(out.dims), f"{step.model_name}.{model_output}")
        if model.max_batch_size < ens.max_batch_size:
            problems.append(Problem("batch", name, f"{where}: {step.model_name} batches at most {model.max_batch_size}, "
                                                   f"the ensemble up to {ens.max_batch_size}"))
    for tensor, (_, _, producer) in available.items():
        # An output nobody reads means nothing waits for its step: a header check whose verdict preprocess
        # does not take would let DALI decode a refused upload alongside it (and fail its whole batch).
        if producer != "ensemble input" and tensor not in consumed:
            problems.append(Problem("wiring", name, f"{tensor!r} from {producer} is read by no later step: "
                                                    "nothing waits for that step"))
    for t in ens.output:
        if t.name not in available:
            problems.append(Problem("wiring", name, f"ensemble output {t.name!r} is produced by no step"))
        elif available[t.name][0] != t.data_type:
            problems.append(Problem("wiring", name, f"ensemble output {t.name!r} is {_dtype(available[t.name][0])}, "
                                                    f"declared {_dtype(t.data_type)}"))
    return problems


def _check_batching(name: str, cfg: mc.ModelConfig, engine_profiles) -> list[Problem]:
    problems = []
    has_batcher = cfg.HasField("dynamic_batching")
    for size in cfg.dynamic_batching.preferred_batch_size:
        if not 1 <= size <= cfg.max_batch_size:
            problems.append(Problem("preferred", name, f"preferred batch size {size} outside 1..{cfg.max_batch_size}"))
    if cfg.platform == "tensorrt_plan" and engine_profiles:
        low = min(p[0] for p in engine_profiles)
        high = max(p[2] for p in engine_profiles)
        covered = lambda b: any(p[0] <= b <= p[2] for p in engine_profiles)  # noqa: E731
        if cfg.max_batch_size > high or low > 1:
            problems.append(Problem("preferred", name, f"max_batch_size {cfg.max_batch_size} needs batches 1.."
                                                       f"{cfg.max_batch_size}; the engine's profiles cover {low}..{high}"))
        for size in cfg.dynamic_batching.preferred_batch_size:
            if not covered(size):
                problems.append(Problem("preferred", name, f"preferred batch size {size} is in no engine profile {engine_profiles}"))
        for graph in cfg.optimization.cuda.graph_spec:
            if not 1 <= graph.batch_size <= cfg.max_batch_size or not covered(graph.batch_size):
                problems.append(Problem("preferred", name, f"CUDA graph batch size {graph.batch_size} is outside "
                                                           f"1..{cfg.max_batch_size} or the engine profiles {engine_profiles}"))
    problems += _check_graphs(name, cfg)
    if has_batcher and cfg.max_batch_size > 0:
        for t in cfg.input:
            if -1 in t.dims and not t.allow_ragged_batch:
                problems.append(Problem("ragged", name, f"input {t.name!r} has variable dims {list(t.dims)} but no "
                                                        "allow_ragged_batch: requests of different sizes never batch"))
    return problems


def _check_graphs(name: str, cfg: mc.ModelConfig) -> list[Problem]:
    cuda = cfg.optimization.cuda
    if not cuda.graphs or not cuda.graph_spec or cfg.max_batch_size < 1:
        return []
    problems, covered = [], set()
    inputs = {t.name for t in cfg.input}
    for graph in cuda.graph_spec:
        low = graph.graph_lower_bound.batch_size if graph.HasField("graph_lower_bound") else graph.batch_size
        if not 1 <= low <= graph.batch_size:
            problems.append(Problem("graphs", name, f"CUDA graph of batch {graph.batch_size}: lower bound {low} must be "
                                                    f"within 1..{graph.batch_size} (Triton refuses to load it)"))
            continue
        bound = graph.graph_lower_bound
        unbounded = [i for i in graph.input if i not in bound.input or len(bound.input[i].dim) != len(graph.input[i].dim)]
        if unbounded:
            problems.append(Problem("graphs", name, f"CUDA graph of batch {graph.batch_size}: its lower bound gives no "
                                                    f"shape of the same rank for {unbounded} (Triton refuses to load it)"))
            continue
        # tensorrt_backend (r24.10 to r26.06, SetCudaGraphShape): without every input's shape in the spec, the
        # bound's key holds the graph's own input shape, batch size included, and only that size matches it.
        if set(graph.input) != inputs or set(bound.input) != inputs:
            low = graph.batch_size
        covered.update(range(low, graph.batch_size + 1))
    missing = sorted(set(range(1, cfg.max_batch_size + 1)) - covered)
    if missing and not problems:
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        problems.append(Problem("graphs", name, f"{len(missing)} batch sizes run without a CUDA graph ({shown}): give "
                                                "the graph specs lower bounds (graph_lower_bound), and both the spec "
                                                "and its bound every input's shape"))
    return problems


def _check_files(name: str, cfg: mc.ModelConfig, model_dir: Path, require_artifacts: bool) -> list[Problem]:
    problems = []
    for t in cfg.output:
        if not t.label_filename:
            continue
        path = model_dir / t.label_filename
        if not path.is_file():
            problems.append(Problem("labels", name, f"label file {t.label_filename} is missing"))
            continue
        lines = path.read_text().splitlines()
        want = t.dims[-1] if t.dims else spec.NUM_CLASSES
        if len(lines) != want or any(not line.strip() for line in lines):
            problems.append(Problem("labels", name, f"{t.label_filename} has {len(lines)} lines "
                                                    f"({sum(not l.strip() for l in lines)} empty); output {t.name} has {want} classes"))
    for warmup in cfg.model_warmup:
        for input_name, data in warmup.inputs.items():
            if not data.input_data_file:
                continue
            path = model_dir / "warmup" / data.input_data_file
            if not path.is_file():
                problems.append(Problem("warmup", name, f"warm-up {warmup.name}: {path.relative_to(model_dir)} is missing"))
                continue
            if any(d < 0 for d in data.dims):
                problems.append(Problem("warmup", name, f"warm-up {warmup.name}: dims {list(data.dims)} must be concrete"))
                continue
            size = _DTYPE_SIZES.get(data.data_type)
            count = 1
            for d in data.dims:
                count *= d
            if size and count * size != path.stat().st_size:
                problems.append(Problem("warmup", name, f"warm-up {warmup.name}: dims {list(data.dims)} are {count * size} "
                                                        f"bytes, {data.input_data_file} has {path.stat().st_size}"))
    if require_artifacts and cfg.platform != "ensemble":
        filename = cfg.default_model_filename or ("model.py" if cfg.backend == "python" else "")
        if filename and not (model_dir / "1" / filename).exists():
            problems.append(Problem("artifact", name, f"1/{filename} is missing (build it with build_engines.py)"))
    return problems


def _check_batcher(name: str, cfg: mc.ModelConfig, model_dir: Path, require_artifacts: bool) -> list[Problem]:
    # Triton's search order (core r24.10 to r26.06): the version folders, then the model folder.
    libraries = [p for p in (model_dir / BATCH_STRATEGY_FILE, *model_dir.glob(f"*/{BATCH_STRATEGY_FILE}")) if p.is_file()]
    if BATCH_PIXELS_PARAMETER not in cfg.parameters:
        if libraries:
            return [Problem("batcher", name, f"{libraries[0].relative_to(model_dir)} is there but the config has no "
                                             f"{BATCH_PIXELS_PARAMETER!r} parameter: Triton fails to load the model")]
        return []
    value = cfg.parameters[BATCH_PIXELS_PARAMETER].string_value
    if not value.isdigit() or int(value) <= 0:
        return [Problem("batcher", name, f"parameter {BATCH_PIXELS_PARAMETER!r} is {value!r}, not a positive integer")]
    if require_artifacts and not libraries:
        return [Problem("batcher", name, f"the config gives a pixel budget ({BATCH_PIXELS_PARAMETER} {value}) but "
                                         f"{BATCH_STRATEGY_FILE} is missing, so Triton batches without it (build it "
                                         "with build_engines.py batcher)")]
    return []


def check_repository(
    repository: Path,
    *,
    profile: spec.Profile | None = None,
    engine_profiles: list[tuple[int, int, int]] | None = None,
    require_artifacts: bool = False,
) -> list[Problem]:
    """All problems found in ``repository``; an empty list means it passed.

    ``engine_profiles`` are the TensorRT engine's (min, opt, max) batch ranges; by default those the build
    derives from ``profile`` (the engine's own metadata is what ``build_engines.py gpu`` checks against).
    """
    repository = Path(repository)
    configs, problems = load_configs(repository)
    if engine_profiles is None and profile is not None and profile.engine is not None:
        from .engines import optimization_profiles

        engine_profiles = optimization_profiles(profile.resnet50.batching)
    for name, cfg in configs.items():
        if cfg.platform == "ensemble":
            problems += _check_ensemble(name, cfg, configs)
        problems += _check_batching(name, cfg, engine_profiles)
        problems += _check_files(name, cfg, repository / name, require_artifacts)
        problems += _check_batcher(name, cfg, repository / name, require_artifacts)
    return problems
