"""The repository validator: the good repositories pass, and a broken variant of each rule is caught."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format

from tritonvision import spec
from tritonvision_server import configs
from tritonvision_server.repocheck import check_repository

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "model_repository"


@pytest.fixture()
def gpu_repo(tmp_path) -> Path:
    dest = tmp_path / "gpu"
    shutil.copytree(COMMITTED, dest)
    return dest


def _edit(repo: Path, model: str, change) -> None:
    path = repo / model / "config.pbtxt"
    cfg = configs.parse(path.read_text())
    change(cfg)
    path.write_text(text_format.MessageToString(cfg))


def _rules(problems) -> set[str]:
    return {p.rule for p in problems}


def test_committed_gpu_repository_passes():
    assert check_repository(COMMITTED, profile=spec.GPU) == []


def test_generated_cpu_repository_passes(tmp_path):
    repo = configs.write_repository(spec.CPU, tmp_path / "cpu", label_names=configs.labels())
    assert check_repository(repo, profile=spec.CPU) == []


def test_fp32_engine_variant_of_the_gpu_repository_passes(tmp_path):
    repo = configs.write_repository(spec.GPU.with_engine_precision("fp32"), tmp_path / "gpu32", label_names=configs.labels())
    assert check_repository(repo, profile=spec.GPU) == []


def _set_pixels_dtype(cfg):
    cfg.output[0].data_type = configs.mc.TYPE_FP32


BROKEN = {
    # rule: (model, edit) -- each edit breaks exactly one thing the validator must catch
    "dtype mismatch along the ensemble": ("wiring", configs.PREPROCESS, _set_pixels_dtype),
    "ensemble output dtype differs from the step producing it": (
        "wiring", configs.RESNET50, lambda c: setattr(c.output[0], "data_type", configs.mc.TYPE_FP16)),
    "ensemble output declared with another dtype than its step produces": (
        "wiring", configs.ENSEMBLE, lambda c: setattr(c.output[0], "data_type", configs.mc.TYPE_FP16)),
    "dims mismatch along the ensemble": ("wiring", configs.RESNET50, lambda c: c.input[0].dims.__setitem__(1, 256)),
    "step reads a tensor nobody produces": (
        "wiring", configs.ENSEMBLE, lambda c: c.ensemble_scheduling.step[2].input_map.__setitem__("PIXELS", "pixelz")),
    "step names a missing model": ("wiring", configs.ENSEMBLE, lambda c: setattr(c.ensemble_scheduling.step[0], "model_name", "nope")),
    "step maps a missing output": (
        "wiring", configs.ENSEMBLE, lambda c: c.ensemble_scheduling.step[1].output_map.__setitem__("LOGITS", "x")),
    "step leaves an input unmapped": ("wiring", configs.ENSEMBLE, lambda c: c.ensemble_scheduling.step[1].input_map.clear()),
    "step batches less than the ensemble": ("batch", configs.PREPROCESS, lambda c: setattr(c, "max_batch_size", 64)),
    "preferred batch size above the max": (
        "preferred", spec.VALIDATE, lambda c: c.dynamic_batching.preferred_batch_size.append(256)),
    "CUDA graph batch size above the max": (
        "preferred", configs.RESNET50, lambda c: c.optimization.cuda.graph_spec.add(batch_size=256)),
    "CUDA graphs without lower bounds leave batch sizes without a graph": (
        "graphs", configs.RESNET50, lambda c: [g.ClearField("graph_lower_bound") for g in c.optimization.cuda.graph_spec]),
    "CUDA graph specs without input shapes, whose lower bounds the TensorRT backend then never matches": (
        "graphs", configs.RESNET50,
        lambda c: [(g.ClearField("input"), g.graph_lower_bound.ClearField("input")) for g in c.optimization.cuda.graph_spec]),
    "CUDA graph lower bound without the input shape its spec gives": (
        "graphs", configs.RESNET50, lambda c: c.optimization.cuda.graph_spec[1].graph_lower_bound.ClearField("input")),
    "CUDA graph lower bound above its batch size": (
        "graphs", configs.RESNET50, lambda c: setattr(c.optimization.cuda.graph_spec[1].graph_lower_bound, "batch_size", 99)),
    "variable-length input without ragged batching": (
        "ragged", configs.PREPROCESS, lambda c: setattr(c.input[0], "allow_ragged_batch", False)),
    "warm-up dims left variable": ("warmup", configs.PREPROCESS, lambda c: c.model_warmup[0].inputs["IMAGE"].dims.__setitem__(0, -1)),
    "warm-up dims not the file's size": (
        "warmup", configs.PREPROCESS, lambda c: c.model_warmup[0].inputs["IMAGE"].dims.__setitem__(0, 1234)),
    "warm-up file missing": (
        "warmup", configs.PREPROCESS, lambda c: setattr(c.model_warmup[0].inputs["IMAGE"], "input_data_file", "gone.jpg")),
    "config name differs from its directory": ("parse", configs.RESNET50, lambda c: setattr(c, "name", "resnet")),
    "neither backend nor platform": ("parse", configs.RESNET50, lambda c: c.ClearField("platform")),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validator_catches_broken_variant(gpu_repo, case):
    rule, model, edit = BROKEN[case]
    _edit(gpu_repo, model, edit)
    problems = check_repository(gpu_repo, profile=spec.GPU)
    assert rule in _rules(problems), f"not caught: {case} (rule {rule!r}); reported {[str(p) for p in problems]}"


def test_validator_catches_a_header_check_that_nothing_waits_for(gpu_repo):
    # preprocess no longer takes validate's verdict: every config is consistent on its own, but DALI would
    # decode uploads that the check refuses, alongside it.
    _edit(gpu_repo, configs.PREPROCESS, lambda c: c.input.pop())
    _edit(gpu_repo, configs.ENSEMBLE, lambda c: c.ensemble_scheduling.step[1].input_map.pop(spec.PIXEL_COUNT.name))
    problems = [str(p) for p in check_repository(gpu_repo, profile=spec.GPU) if p.rule != "warmup"]
    assert problems == ["[wiring] classifier: 'pixel_count' from validate.PIXEL_COUNT is read by no later step: "
                        "nothing waits for that step"], problems


def test_validator_catches_a_config_that_does_not_parse(gpu_repo):
    path = gpu_repo / configs.RESNET50 / "config.pbtxt"
    path.write_text(path.read_text().replace("max_batch_size: 128", "max_batch_size: many"))
    problems = check_repository(gpu_repo, profile=spec.GPU)
    assert [p.model for p in problems if p.rule == "parse"] == [configs.RESNET50]


def test_validator_catches_an_unknown_field(gpu_repo):
    path = gpu_repo / configs.PREPROCESS / "config.pbtxt"
    path.write_text(path.read_text() + "\nmax_queue_delay: 5\n")
    assert "parse" in _rules(check_repository(gpu_repo, profile=spec.GPU))


def test_validator_catches_preferred_batch_sizes_outside_the_engine_profiles(gpu_repo):
    problems = check_repository(gpu_repo, engine_profiles=[(1, 32, 64)])
    messages = " ".join(str(p) for p in problems if p.rule == "preferred")
    assert "preferred batch size 128" in messages and "max_batch_size 128" in messages


@pytest.mark.parametrize("lines", [999, 1001])
def test_validator_catches_a_label_file_with_the_wrong_line_count(gpu_repo, lines):
    (gpu_repo / configs.RESNET50 / "labels.txt").write_text("\n".join(f"class {i}" for i in range(lines)) + "\n")
    problems = check_repository(gpu_repo, profile=spec.GPU)
    assert [p.model for p in problems if p.rule == "labels"] == [configs.RESNET50]


def test_validator_catches_a_missing_label_file(gpu_repo):
    (gpu_repo / configs.ENSEMBLE / "labels.txt").unlink()
    assert [p.model for p in check_repository(gpu_repo, profile=spec.GPU) if p.rule == "labels"] == [configs.ENSEMBLE]


def test_validator_requires_built_artifacts_only_when_asked(gpu_repo, batch_strategy):
    assert check_repository(gpu_repo, profile=spec.GPU) == []
    missing = {(p.model, p.rule) for p in check_repository(gpu_repo, profile=spec.GPU, require_artifacts=True)}
    # model.plan is built on the GPU host and batchstrategy.so where the server runs; dali.py is generated
    # with the configs.
    assert missing == {(configs.RESNET50, "artifact"), (configs.PREPROCESS, "batcher")}
    (gpu_repo / configs.RESNET50 / "1" / "model.plan").write_bytes(b"x")
    shutil.copyfile(batch_strategy, gpu_repo / configs.PREPROCESS / "batchstrategy.so")
    assert check_repository(gpu_repo, profile=spec.GPU, require_artifacts=True) == []
    (gpu_repo / configs.PREPROCESS / "1" / configs.DALI_FILE).unlink()
    missing = [str(p) for p in check_repository(gpu_repo, profile=spec.GPU, require_artifacts=True)]
    assert len(missing) == 1 and "1/dali.py is missing" in missing[0]


def test_check_command_exits_1_on_a_broken_repository(gpu_repo):
    from tritonvision_server.build_engines import main

    assert main(["check", str(gpu_repo)]) == 0
    _edit(gpu_repo, configs.PREPROCESS, _set_pixels_dtype)
    assert main(["check", str(gpu_repo)]) == 1


def test_validator_reports_a_pixel_budget_whose_batching_strategy_is_missing(gpu_repo, batch_strategy):
    # Without the library Triton loads preprocess all the same and batches with no pixel budget.
    def batcher(repo):
        return [str(p) for p in check_repository(repo, profile=spec.GPU, require_artifacts=True) if p.rule == "batcher"]

    missing = batcher(gpu_repo)
    assert len(missing) == 1 and "preprocess" in missing[0] and "batchstrategy.so is missing" in missing[0]
    # The committed repository (no built artifacts) passes the check that does not ask for them.
    assert not [p for p in check_repository(gpu_repo, profile=spec.GPU) if p.rule == "batcher"]
    shutil.copyfile(batch_strategy, gpu_repo / configs.PREPROCESS / "batchstrategy.so")
    assert batcher(gpu_repo) == []


def test_validator_reports_a_batching_strategy_without_its_budget(gpu_repo, batch_strategy):
    shutil.copyfile(batch_strategy, gpu_repo / configs.PREPROCESS / "batchstrategy.so")
    _edit(gpu_repo, configs.PREPROCESS, lambda c: c.parameters.pop("max_batch_pixels"))
    problems = [str(p) for p in check_repository(gpu_repo, profile=spec.GPU) if p.rule == "batcher"]
    assert problems == ["[batcher] preprocess: batchstrategy.so is there but the config has no 'max_batch_pixels' "
                        "parameter: Triton fails to load the model"]
    _edit(gpu_repo, configs.PREPROCESS, lambda c: c.parameters["max_batch_pixels"].__setattr__("string_value", "-1"))
    problems = [str(p) for p in check_repository(gpu_repo, profile=spec.GPU) if p.rule == "batcher"]
    assert problems == ["[batcher] preprocess: parameter 'max_batch_pixels' is '-1', not a positive integer"]
