"""The gpu-torch profile end to end on the real bundled Triton server, with its PyTorch steps on the CPU override.

The same model code as on a GPU (nvJPEG and CUDA graphs aside), the same configs but for the instance kind
and device: same answers as the cpu profile for the same photos, a bad upload refused alone, EXIF applied.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from conftest import BUILD, TEST_WEIGHTS
from image_helpers import orientation_exif, undecodable_jpeg
from sdk_helpers import classify_in_threads
from tritonvision import Classifier, InvalidImageError, spec
from tritonvision_server import configs

pytest.importorskip("torch")

# Scores are softmax probabilities (top ones ~0.01-0.06 with the random:0 weights). The cpu profile feeds
# DALI's FP32 pixels to ONNX Runtime; gpu-torch feeds its own pixels (within one grey level of DALI's,
# test_torch_pipeline) in FP16 to PyTorch in FP32. Measured here: at most 2e-6 apart (the SDK's scores have six
# decimals); the bound is the cpu profile's own tolerance against its reference divided by ten.
SCORE_TOLERANCE = 1e-4
# Classes whose scores are this close are tied: the two profiles may rank them either way.
TIE = 5e-4


@pytest.fixture(scope="module")
def gpu_torch_repository():
    from tritonvision_server.build_engines import build_gpu_torch_repository

    return build_gpu_torch_repository(BUILD / "model_repository_gpu_torch_cpu", TEST_WEIGHTS, device="cpu",
                                      state_dict=BUILD / "resnet50_state_dict.pt")


@pytest.fixture(scope="module")
def gpu_torch_server(gpu_torch_repository):
    from tritonvision_server.launcher import TritonServer

    server = TritonServer(gpu_torch_repository, log_file=BUILD / "tritonserver_gpu_torch.log", startup_timeout=240)
    with server:
        yield server
    assert not server.leftover_shm(), "the server left shared-memory files behind"


@pytest.fixture()
def torch_classifier(gpu_torch_server):
    with Classifier(gpu_torch_server.grpc_url, timeout=180) as clf:
        yield clf


def test_gpu_torch_configs_put_both_steps_on_gpu_instances_with_gpu_inputs_for_the_model():
    cfg = configs.configs(spec.GPU_TORCH)
    pre, net = cfg[spec.PREPROCESS], cfg[spec.RESNET50]
    assert pre.backend == net.backend == "python" and not net.platform
    assert {g.kind for m in (pre, net) for g in m.instance_group} == {configs.mc.ModelInstanceGroup.KIND_GPU}
    # PIXELS stay in GPU memory between the steps; the encoded bytes must reach nvJPEG from host memory.
    assert net.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    assert pre.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "yes"
    assert pre.output[0].data_type == net.input[0].data_type == configs.mc.TYPE_FP16
    sizes = [int(s) for s in net.parameters["cuda_graph_batch_sizes"].string_value.split(",")]
    assert sizes == list(spec.GPU_TORCH.cuda_graph_batch_sizes) and sizes[-1] == net.max_batch_size
    assert net.parameters["precision"].string_value == "fp16" and net.parameters["device"].string_value == "cuda"
    # The CPU override changes only where the steps run.
    cpu = configs.configs(spec.GPU_TORCH.on_cpu())
    assert {g.kind for m in (cpu[spec.PREPROCESS], cpu[spec.RESNET50]) for g in m.instance_group} == {
        configs.mc.ModelInstanceGroup.KIND_CPU}
    assert cpu[spec.RESNET50].parameters["device"].string_value == "cpu"
    assert cpu[spec.ENSEMBLE] == cfg[spec.ENSEMBLE]


def test_gpu_torch_gives_each_gpu_its_instances_run_on_a_cuda_memory_pool():
    # A KIND_GPU instance group without a gpus list puts its instances on every visible GPU.
    import torch

    from tritonvision_server.serve import gpu_torch_server_args

    pools = [a for a in gpu_torch_server_args(4) if a.startswith("--cuda-memory-pool-byte-size=")]
    assert pools == [f"--cuda-memory-pool-byte-size={i}:{1 << 30}" for i in range(4)]
    assert "--pinned-memory-pool-byte-size=268435456" in gpu_torch_server_args(1)
    here = [a for a in gpu_torch_server_args() if a.startswith("--cuda-memory-pool-byte-size=")]
    assert len(here) == torch.cuda.device_count()
    assert not any(g.gpus for m in configs.configs(spec.GPU_TORCH).values() for g in m.instance_group)


def test_gpu_torch_repository_runs_the_torch_models_with_the_state_dict(gpu_torch_repository):
    from tritonvision_server.repocheck import check_repository

    for step in (spec.PREPROCESS, spec.RESNET50):
        assert f"tritonvision_server.backends.torch_{step}" in (gpu_torch_repository / step / "1" / "model.py").read_text()
    weights = gpu_torch_repository / spec.RESNET50 / "1" / configs.TORCH_WEIGHTS_FILE
    assert weights.stat().st_size > 90_000_000
    assert check_repository(gpu_torch_repository, profile=spec.GPU_TORCH.on_cpu(), require_artifacts=True) == []


def test_gpu_torch_classifies_photos_like_the_cpu_profile(torch_classifier, classifier, photos):
    worst = 0.0
    for name, data in photos.items():
        got, want = torch_classifier.classify(data, top_k=5), classifier.classify(data, top_k=5)
        assert got[0].index == want[0].index, (name, got, want)
        cpu_scores = {p.index: p.score for p in want}
        for rank, (g, w) in enumerate(zip(got, want)):
            assert g.index == w.index or abs(g.score - w.score) <= TIE, (name, rank, got, want)
            if g.index in cpu_scores:
                worst = max(worst, abs(g.score - cpu_scores[g.index]))
                assert abs(g.score - cpu_scores[g.index]) <= SCORE_TOLERANCE, (name, g, cpu_scores[g.index])
    print(f"largest score difference gpu-torch (CPU override) vs cpu profile: {worst:.2e}")


def test_gpu_torch_refuses_a_corrupt_image_alone_among_concurrent_requests(torch_classifier, photos):
    good = photos["chelsea"]
    blobs = [good, undecodable_jpeg(good), good, good[: len(good) // 2], good, b"not an image"]
    before = torch_classifier.settled_statistics()
    outcomes = classify_in_threads(torch_classifier, blobs)
    errors = sorted(i for i, o in outcomes.items() if isinstance(o, InvalidImageError))
    assert errors == [1, 3, 5], outcomes
    assert "could not decode the JPEG image" in outcomes[1].message
    expected = [p.index for p in outcomes[0]]
    assert all([p.index for p in outcomes[i]] == expected for i in (2, 4))
    # The requests shared dynamic batches: a refusal did not cost the others their batch.
    pre = torch_classifier.settled_statistics().models[spec.PREPROCESS] - before.models[spec.PREPROCESS]
    assert pre.execution_count < len(blobs), pre


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_gpu_torch_turns_an_exif_rotated_photo_upright(orientation, torch_classifier, photos):
    from PIL import Image

    upright = Image.open(io.BytesIO(photos["chelsea"]))
    stored = upright.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                                8: Image.Transpose.ROTATE_270}[orientation])
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=orientation_exif(orientation))
    rotated = torch_classifier.classify(buf.getvalue(), top_k=3)
    upright_top = torch_classifier.classify(photos["chelsea"], top_k=3)
    assert [p.index for p in rotated] == [p.index for p in upright_top]
    assert np.allclose([p.score for p in rotated], [p.score for p in upright_top], atol=2e-3)


def test_gpu_torch_decodes_png_on_the_cpu_fallback_like_the_jpeg(torch_classifier, photos):
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(photos["coffee"])).save(buf, format="PNG")
    png, jpeg = torch_classifier.classify(buf.getvalue(), top_k=3), torch_classifier.classify(photos["coffee"], top_k=3)
    assert [p.index for p in png] == [p.index for p in jpeg]


def test_serving_gpu_torch_without_cuda_exits_with_the_reason(caplog):
    import torch

    from tritonvision._cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["serve", "--profile", "gpu-torch", "--model-repository", "/nonexistent"]) == 1
    assert "needs a CUDA GPU" in caplog.text and "--torch-device cpu" in caplog.text


def test_serve_gpu_torch_with_the_cpu_override_builds_its_repository_and_serves(tmp_path, photos):
    import os

    from sdk_helpers import serve_classify_and_interrupt

    # The override through the environment; the repository is built under the working directory's build/.
    code, out, _ = serve_classify_and_interrupt(["--profile", "gpu-torch", "--weights", TEST_WEIGHTS], photos["coffee"],
                                                ready_timeout=240, cwd=tmp_path,
                                                env=dict(os.environ, TRITONVISION_TORCH_DEVICE="cpu"))
    assert code == 0, out
    repo = tmp_path / "build" / "model_repository_gpu_torch_cpu"
    assert (repo / spec.RESNET50 / "1" / configs.TORCH_WEIGHTS_FILE).exists()
    assert configs.parse((repo / spec.RESNET50 / "config.pbtxt").read_text()).parameters["device"].string_value == "cpu"
    # No CUDA pools were asked of a server without CUDA.
    assert "--cuda-memory-pool-byte-size" not in out


@pytest.mark.gpu
def test_gpu_torch_on_cuda_answers_like_the_cpu_override(torch_classifier, photos):
    """nvJPEG, FP16 and CUDA graphs, with the pixels handed over through DLPack in GPU memory."""
    from tritonvision_server.build_engines import build_gpu_torch_repository
    from tritonvision_server.launcher import TritonServer
    from tritonvision_server.serve import gpu_torch_server_args

    repo = build_gpu_torch_repository(BUILD / "model_repository_gpu_torch", TEST_WEIGHTS, device="cuda",
                                      state_dict=BUILD / "resnet50_state_dict.pt")
    with TritonServer(repo, extra_args=gpu_torch_server_args(), startup_timeout=300) as server, \
            Classifier(server.grpc_url, timeout=120) as gpu:
        for name, data in photos.items():
            got, want = gpu.classify(data, top_k=5), torch_classifier.classify(data, top_k=5)
            assert got[0].index == want[0].index, (name, got, want)
            # FP16 model and pixels, nvJPEG against libjpeg-turbo.
            assert abs(got[0].score - want[0].score) <= 2e-3, (name, got[0], want[0])
        good = photos["chelsea"]
        results = gpu.classify_batch([good, undecodable_jpeg(good), good], return_exceptions=True)
        assert isinstance(results[1], InvalidImageError)
        assert [p.index for p in results[0]] == [p.index for p in results[2]]


def test_gpu_torch_classifies_an_arithmetic_coded_jpeg_like_the_cpu_profile_and_refuses_12_bit_as_it(
        torch_classifier, classifier):
    # nvJPEG decodes neither; the arithmetic-coded JPEG goes to PIL instead, the 12-bit one no profile decodes.
    from pathlib import Path

    kinds = Path(__file__).parent / "jpeg_kinds"
    arithmetic = (kinds / "arithmetic.jpg").read_bytes()
    got, want = torch_classifier.classify(arithmetic, top_k=5), classifier.classify(arithmetic, top_k=5)
    assert got[0].index == want[0].index
    assert all(abs(g.score - w.score) <= SCORE_TOLERANCE for g, w in zip(got, want) if g.index == w.index)
    twelve = (kinds / "twelve_bit.jpg").read_bytes()
    for clf in (torch_classifier, classifier):
        with pytest.raises(InvalidImageError):
            clf.classify(twelve)
