"""The pixel budget of the gpu profile's DALI batches, in the real (bundled) Triton server.

Triton 2.51 has no DALI backend, so ``preprocess`` is a python-backend stand-in with the generated config
(``configs.write_batch_recorder_repository``): the budget is enforced by Triton's batcher through the
compiled batching strategy (``batchstrategy.so``), before any backend sees the batch, so the stand-in
receives the batches DALI would. It records each batch's pixel counts (one sum per request) and takes 0.3 s
a batch, so that requests queue behind its two busy instances as they would behind DALI under load.
``validate`` (the real step) and a light ``resnet50`` complete the gpu ensemble; clients send to
``classifier``. The same burst against the same repository without the library is the control. First, the parts that need
no server: the spec's rules for a budget, the generated configs, and ``build_engines.py batcher``.
"""

from __future__ import annotations

import queue
import random
import time
from pathlib import Path

import numpy as np
import pytest

from image_helpers import png_claiming
from tritonvision import spec
from tritonvision_server import batchstrategy, configs
from tritonvision_server.configs import mc

BUDGET = spec.GPU.max_batch_pixels
EXECUTE_SECONDS = 0.3

HUGE = (10954, 10954)  # 120.0 MP, just under max_pixels: four fill a batch
LARGE = (8000, 6000)  # 48 MP
PHOTO = (2000, 1500)  # 3 MP
FULL_BATCH_PHOTO = (2500, 1500)  # 3.75 MP: 128 of them are exactly the budget

# --- spec, configs, build --------------------------------------------------------------------------------


def test_a_full_batch_of_ordinary_photos_fits_the_budget_and_four_images_at_the_limit_fill_it():
    assert 128 * FULL_BATCH_PHOTO[0] * FULL_BATCH_PHOTO[1] <= BUDGET
    assert 4 * spec.IMAGE_LIMITS.max_pixels <= BUDGET < 5 * spec.IMAGE_LIMITS.max_pixels


def test_preprocess_config_names_the_budget_and_validate_the_same_limit_per_request():
    pre, val = configs.preprocess_config(spec.GPU), configs.validate_config(spec.GPU)
    assert pre.parameters[batchstrategy.BATCH_PIXELS_PARAMETER].string_value == str(BUDGET)
    assert val.parameters[batchstrategy.REQUEST_PIXELS_PARAMETER].string_value == str(BUDGET)
    assert [o.name for o in val.output] == [spec.PIXEL_COUNT.name] and val.output[0].data_type == mc.TYPE_INT64
    # No queue delay and every size preferred: batches are closed when formed, never grown or merged later.
    assert pre.dynamic_batching.max_queue_delay_microseconds == 0
    assert list(pre.dynamic_batching.preferred_batch_size) == list(range(1, pre.max_batch_size + 1))
    for profile in (spec.CPU, spec.GPU_TORCH):
        assert batchstrategy.BATCH_PIXELS_PARAMETER not in configs.preprocess_config(profile).parameters


@pytest.mark.parametrize("batching", [dict(max_queue_delay_us=500), dict(preferred_batch_sizes=(32, 64, 128))])
def test_a_budget_refuses_batching_under_which_triton_grows_or_merges_batches_past_it(batching):
    from dataclasses import replace

    step = replace(spec.GPU.preprocess, batching=replace(spec.GPU.preprocess.batching, **batching))
    with pytest.raises(ValueError, match="max_queue_delay_us 0 and every batch size"):
        replace(spec.GPU, preprocess=step)
    replace(spec.GPU, preprocess=step, max_batch_pixels=0)  # without a budget any batching goes


def test_batcher_subcommand_builds_the_library_where_triton_looks_for_it(tmp_path):
    from tritonvision_server import build_engines

    assert build_engines.main(["batcher", "--output", str(tmp_path)]) == 0
    built = tmp_path / spec.PREPROCESS / "batchstrategy.so"
    data = built.read_bytes()
    assert data[:4] == b"\x7fELF"
    # Triton requires all five functions or none (core r24.10, TritonModel::SetBatchingStrategy).
    for function in ("ModelBatcherInitialize", "ModelBatcherFinalize", "ModelBatchInitialize",
                     "ModelBatchIncludeRequest", "ModelBatchFinalize"):
        assert f"TRITONBACKEND_{function}\0".encode() in data


def test_batcher_subcommand_without_a_compiler_names_what_to_install(tmp_path, monkeypatch, caplog):
    from tritonvision_server import build_engines

    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no cc, gcc or clang
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(batchstrategy.CompilerNotFound, match="tried cc, gcc, clang"):
        batchstrategy.find_compiler()
    assert build_engines.main(["batcher", "--output", str(tmp_path / "repo")]) == 2
    assert "no C compiler found" in caplog.text and "apt-get install gcc" in caplog.text
    assert not (tmp_path / "repo" / spec.PREPROCESS / "batchstrategy.so").exists()


def test_batcher_subcommand_reports_the_compilers_own_error(tmp_path, caplog):
    from tritonvision_server import build_engines

    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'pixel_budget.c:1: error: something is wrong' >&2\nexit 1\n")
    broken.chmod(0o755)
    assert build_engines.main(["batcher", "--cc", str(broken), "--output", str(tmp_path / "repo")]) == 2
    assert "failed to build the batching strategy (exit 1)" in caplog.text and "something is wrong" in caplog.text
    assert not (tmp_path / "repo" / spec.PREPROCESS / "batchstrategy.so").exists()


# --- the real server ---------------------------------------------------------------------------------------


class _Served:
    def __init__(self, server, repo: Path):
        self.server, self.repo = server, repo

    def batches(self) -> list[list[int]]:
        """Each batch preprocess ran since the last call: the pixel count of each of its requests."""
        return configs.read_batch_log(self.repo)


def _serve(tmp_path_factory, name: str, library: Path | None):
    from tritonvision_server.launcher import TritonServer

    repo = configs.write_batch_recorder_repository(tmp_path_factory.mktemp(name), library=library,
                                                   execute_seconds=EXECUTE_SECONDS)
    return TritonServer(repo, log_file=repo / "tritonserver.log"), repo


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory, batch_strategy):
    server, repo = _serve(tmp_path_factory, "budget", batch_strategy)
    with server:
        yield _Served(server, repo)


@pytest.fixture(scope="module")
def control_server(tmp_path_factory):
    server, repo = _serve(tmp_path_factory, "control", None)
    with server:
        yield _Served(server, repo)


def _ensemble_request(image: bytes):
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput(spec.IMAGE.name, [1, len(image)], "UINT8")
    inp.set_data_from_numpy(np.frombuffer(image, np.uint8)[None])
    return spec.ENSEMBLE, [inp]


def _direct_request(rows: int, counts: list[int]):
    """A request straight to preprocess, past validate: ``rows`` images and the pixel counts given."""
    import tritonclient.grpc as grpcclient

    image = png_claiming(*PHOTO)
    inp = grpcclient.InferInput(spec.IMAGE.name, [rows, len(image)], "UINT8")
    inp.set_data_from_numpy(np.tile(np.frombuffer(image, np.uint8), (rows, 1)))
    count = grpcclient.InferInput(spec.PIXEL_COUNT.name, [rows, 1], spec.PIXEL_COUNT.dtype)
    count.set_data_from_numpy(np.array(counts, dtype=np.int64).reshape(rows, 1))
    return spec.PREPROCESS, [inp, count]


def _burst(served: _Served, requests: list, lead: int = 0) -> tuple[list, list[list[int]]]:
    """Send ``requests`` ((model, inputs), ...) at once; their (result, error) in order, and the batches run.
    With ``lead``, the first ``lead`` requests go first and the rest a third of a batch's time later, once
    those keep preprocess's instances busy: the rest then queue together."""
    import tritonclient.grpc as grpcclient

    served.batches()
    results: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(served.server.grpc_url) as client:
        for i, (model, inputs) in enumerate(requests):
            if lead and i == lead:
                time.sleep(EXECUTE_SECONDS / 3)
            client.async_infer(model, inputs, lambda result, error, i=i: results.put((i, result, error)),
                               client_timeout=120)
        got = dict((i, (r, e)) for i, r, e in (results.get(timeout=180) for _ in requests))
    # The stand-in writes its line before it answers: every batch is on file once every answer is in.
    return [got[i] for i in range(len(requests))], served.batches()


def _images(sizes: list[tuple[int, int]]) -> list[bytes]:
    return [png_claiming(w, h, tag=i) for i, (w, h) in enumerate(sizes)]


def _mixed_burst() -> list[tuple[int, int]]:
    sizes = [HUGE] * 12 + [LARGE] * 6 + [PHOTO] * 40
    random.Random(0).shuffle(sizes)
    return sizes


def _assert_all_classified(outcomes) -> None:
    errors = [e.message() for _, e in outcomes if e is not None]
    assert not errors, errors[:3]
    assert all(r.as_numpy(spec.SCORES.name).shape[-1] == spec.NUM_CLASSES for r, _ in outcomes)


def _describe(batches: list[list[int]]) -> str:
    return "; ".join(f"{len(b)} req / {sum(b) / 1e6:.0f} MP" for b in batches)


def test_no_batch_of_several_requests_exceeds_the_pixel_budget(budget_server):
    sizes = _mixed_burst()
    outcomes, batches = _burst(budget_server, [_ensemble_request(i) for i in _images(sizes)])
    print(f"budget {BUDGET / 1e6:.0f} MP; batches: {_describe(batches)}")
    _assert_all_classified(outcomes)
    # Every image's pixel count reached the batcher (and the stand-in) exactly as validate measured it.
    assert sorted(c for b in batches for c in b) == sorted(w * h for w, h in sizes)
    assert max(len(b) for b in batches) > 1, "nothing was batched: the burst did not queue"
    over = [b for b in batches if len(b) > 1 and sum(b) > BUDGET]
    assert not over, f"batches over the budget: {_describe(over)}"
    # Four 120 MP images fill a batch: the 12 take at least three.
    assert sum(1 for b in batches if HUGE[0] * HUGE[1] in b) >= 3


def test_ordinary_photos_still_fill_large_batches(budget_server):
    sizes = [FULL_BATCH_PHOTO] * 128
    outcomes, batches = _burst(budget_server, [_ensemble_request(i) for i in _images(sizes)])
    print(f"batches: {_describe(batches)}")
    _assert_all_classified(outcomes)
    assert all(sum(b) <= BUDGET for b in batches)
    # While the two instances are busy with the first batches the rest queue and leave together.
    assert max(len(b) for b in batches) >= 32, _describe(batches)


# Past validate, straight to preprocess: one request of 5 x 120 MP (600 MP, over the budget on its own), and
# one whose count is negative (malformed: counts as the whole budget).
OVER = [120_000_000] * 4 + [120_000_001]
NEGATIVE = [-7]


def _isolation_burst(served: _Served) -> tuple[list, list[list[int]], dict[int, int]]:
    """Two photos that keep both instances busy, then 20 photos, the two direct requests and 20 more photos,
    which queue together; the outcomes, the batches, and the size of the batch each direct request ran in."""
    photos = [_ensemble_request(i) for i in _images([PHOTO] * 42)]
    requests = photos[:22] + [_direct_request(5, OVER), _direct_request(1, NEGATIVE)] + photos[22:]
    outcomes, batches = _burst(served, requests, lead=2)
    sizes = {total: len(b) for b in batches for total in (sum(OVER), sum(NEGATIVE)) if total in b}
    return outcomes, batches, sizes


def test_a_request_over_the_budget_or_with_a_malformed_count_runs_alone_and_succeeds(budget_server):
    outcomes, batches, sizes = _isolation_burst(budget_server)
    print(f"batches: {_describe(batches)}")
    errors = [e.message() for _, e in outcomes if e is not None]
    assert not errors, errors[:3]
    assert outcomes[22][0].as_numpy(spec.PIXELS("FP16").name).shape == (5, 3, 224, 224)
    assert outcomes[23][0].as_numpy(spec.PIXELS("FP16").name).shape == (1, 3, 224, 224)
    assert sizes == {sum(OVER): 1, sum(NEGATIVE): 1}, _describe(batches)
    assert max(len(b) for b in batches) > 1
    assert all(sum(b) <= BUDGET for b in batches if len(b) > 1)


def test_validate_refuses_a_request_whose_images_together_exceed_the_budget(budget_server):
    import tritonclient.grpc as grpcclient

    image = png_claiming(*HUGE)
    rows = np.tile(np.frombuffer(image, np.uint8), (5, 1))  # 5 x 120 MP: one request, never split
    inp = grpcclient.InferInput(spec.IMAGE.name, list(rows.shape), "UINT8")
    inp.set_data_from_numpy(rows)
    with grpcclient.InferenceServerClient(budget_server.server.grpc_url) as client:
        with pytest.raises(grpcclient.InferenceServerException) as refused:
            client.infer(spec.ENSEMBLE, [inp])
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert spec.refusal_reason(refused.value.message()) == "header"
        assert "megapixels together" in refused.value.message()
        inp.set_shape([4, rows.shape[1]])  # four fit
        inp.set_data_from_numpy(rows[:4])
        assert client.infer(spec.ENSEMBLE, [inp]).as_numpy(spec.SCORES.name).shape == (4, spec.NUM_CLASSES)
    assert budget_server.batches()[-1] == [4 * HUGE[0] * HUGE[1]]


def test_the_server_logs_the_budget_it_loaded(budget_server):
    text = budget_server.server.log_file.read_text()
    assert f"a dynamic batch holds at most {BUDGET} decoded pixels" in text
    assert "Loading custom batching strategy library" in text


def test_without_the_library_the_same_burst_forms_batches_over_the_budget(control_server):
    # The control: same repository and burst, no batchstrategy.so. It shows the first test can fail.
    outcomes, batches = _burst(control_server, [_ensemble_request(i) for i in _images(_mixed_burst())])
    print(f"no budget; batches: {_describe(batches)}")
    _assert_all_classified(outcomes)
    assert any(len(b) > 1 and sum(b) > BUDGET for b in batches), _describe(batches)


def test_without_the_library_requests_over_the_budget_share_their_batch(control_server):
    # The control of the test above: the same requests, queued the same way, do not run alone.
    outcomes, batches, sizes = _isolation_burst(control_server)
    print(f"no budget; batches: {_describe(batches)}")
    assert not [e for _, e in outcomes if e is not None]
    assert max(sizes.values()) > 1, _describe(batches)
