"""The gpu-torch profile's PyTorch compute on the CPU: geometry against torchvision and the DALI pipeline,
EXIF orientation, per-image decode failures, the CUDA-graph runner's padding, and the model's weights."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from image_helpers import jpeg, orientation_exif, undecodable_jpeg
from reference import torchvision_pixels
from tritonvision import spec
from tritonvision_server.imagecheck import is_frame_header, jpeg_segments

tp = pytest.importorskip("tritonvision_server.torch_pipeline")
torch = tp.torch

# One grey level of 255 after normalisation (the DALI pipeline's tolerance in test_pipeline.py): torchvision's
# reference resizes in uint8 in PIL, this pipeline in float (rounded to whole grey levels) with PyTorch.
GREY_LEVEL = 1.0 / 255 / min(spec.PREPROCESSING.std)
FP16_ROUNDING = 2e-3  # |pixel| <= 2.7 after normalisation: FP16's spacing there is 2**-9


def _pixels(photos: dict[str, bytes], names, dtype=torch.float32) -> np.ndarray:
    images = tp.decode([np.frombuffer(photos[n], np.uint8) for n in names], "cpu")
    return tp.preprocess(images, "cpu", dtype).float().numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["FP32", "FP16"])
def test_torch_preprocessing_matches_torchvision_reference_within_one_grey_level(odd_photos, dtype):
    names = sorted(odd_photos)
    out = _pixels(odd_photos, names, dtype)
    assert out.shape == (len(names), 3, 224, 224)
    diffs = {n: float(np.abs(out[i] - torchvision_pixels(odd_photos[n])).max()) for i, n in enumerate(names)}
    print(f"max abs diff vs torchvision: {diffs}")
    tolerance = GREY_LEVEL + (FP16_ROUNDING if dtype == torch.float16 else 1e-5)
    assert max(diffs.values()) <= tolerance, diffs
    # Most pixels agree exactly: a systematic shift (a half-pixel offset, a wrong mean) would not.
    mean = float(np.mean([np.abs(out[i] - torchvision_pixels(odd_photos[n])).mean() for i, n in enumerate(names)]))
    assert mean < 0.2 * GREY_LEVEL, mean


def test_torch_preprocessing_matches_the_cpu_profile_dali_pipeline(odd_photos):
    from tritonvision_server.pipeline import CpuPreprocessor

    names = sorted(odd_photos)
    dali = CpuPreprocessor(max_batch_size=len(names), num_threads=2)([np.frombuffer(odd_photos[n], np.uint8) for n in names])
    diff = np.abs(_pixels(odd_photos, names) - dali)
    print(f"max abs diff vs DALI per photo: {dict(zip(names, diff.reshape(len(names), -1).max(axis=1).round(4)))}")
    # Both round to whole grey levels after resizing; they differ by at most one (measured: 0 or 1 per photo).
    assert diff.max() <= GREY_LEVEL + 1e-5
    assert diff.mean() < 0.2 * GREY_LEVEL


def test_images_of_one_size_resized_together_equal_each_resized_alone(odd_photos):
    names = ["chelsea", "tiny_57x43", "chelsea", "coffee", "tiny_57x43", "chelsea"]
    images = tp.decode([np.frombuffer(odd_photos[n], np.uint8) for n in names], "cpu")
    together = tp.resize_crop(images)
    alone = torch.cat([tp.resize_crop([img]) for img in images])
    assert together.shape == (len(names), 3, 224, 224)
    assert torch.equal(together, alone), "grouping by size must not change or reorder any image"
    assert not torch.equal(together[0], together[1])


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (256, 256), (257, 333), (97, 301), (511, 129), (57, 43),
                                  (4032, 3024), (225, 1000)])
def test_geometry_is_torchvisions_resize_and_center_crop(size):
    from PIL import Image
    from torchvision import transforms

    width, height = size
    resized = transforms.Resize(256)(Image.new("RGB", (width, height)))
    assert tp.resized_size(height, width) == (resized.height, resized.width)
    # CenterCrop's offsets, read off a crop of an image whose pixels are their own coordinates.
    ys, xs = np.mgrid[: resized.height, : resized.width]
    coords = torch.from_numpy(np.stack([ys, xs]))
    cropped = transforms.CenterCrop(224)(coords)
    assert tp.crop_offsets(resized.height, resized.width) == (int(cropped[0, 0, 0]), int(cropped[1, 0, 0]))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied_as_pil_does(orientation):
    import skimage.data
    from PIL import Image, ImageOps

    data = jpeg(skimage.data.coffee()[:300, :451], exif=orientation_exif(orientation))
    assert tp.jpeg_info(data) == tp.JpegInfo(components=3, orientation=orientation)
    (decoded,) = tp.decode([np.frombuffer(data, np.uint8)], "cpu")
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")).transpose(2, 0, 1)
    assert tuple(decoded.shape) == expected.shape
    # Same libjpeg-turbo underneath; a wrong turn would differ by ~100 grey levels on average.
    assert np.abs(decoded.numpy().astype(int) - expected).mean() < 1.0


def test_jpeg_info_reads_components_and_routes_cmyk_and_other_formats_to_pil(odd_photos, photos):
    from image_helpers import encode

    assert tp.jpeg_info(odd_photos["cmyk"]).components == 4
    assert tp.jpeg_info(odd_photos["greyscale"]).components == 1
    assert tp.jpeg_info(photos["chelsea"]) == tp.JpegInfo(3, 1)
    png = encode(np.zeros((8, 8, 3), np.uint8), "PNG")
    assert tp.jpeg_info(png) is None and tp.jpeg_info(b"\xff\xd8\xff") is None
    # CMYK (PIL) and greyscale (libjpeg) both come out as 3-channel RGB like the reference.
    out = _pixels(odd_photos, ["cmyk", "greyscale"])
    for i, n in enumerate(["cmyk", "greyscale"]):
        assert np.abs(out[i] - torchvision_pixels(odd_photos[n])).max() <= GREY_LEVEL + 1e-5


JPEG_KINDS = Path(__file__).parent / "jpeg_kinds"  # files Pillow cannot write; how each was made: README.md there


def _hierarchical(data: bytes) -> bytes:
    """``data`` with its frame header marked SOF5 (hierarchical, differential sequential): a header only, as
    no encoder at hand writes hierarchical JPEGs (and no decoder here reads them)."""
    out = bytearray(data)
    for marker, i, _ in jpeg_segments(data):
        if is_frame_header(marker):
            out[i + 1] = 0xC5
            return bytes(out)
    raise AssertionError("no frame header")


@pytest.mark.parametrize(("kind", "frame", "precision", "nvjpeg"), [
    ("baseline", 0xC0, 8, True), ("progressive", 0xC2, 8, True), ("arithmetic", 0xC9, 8, False),
    ("arithmetic_progressive", 0xCA, 8, False), ("lossless", 0xC3, 8, False), ("twelve_bit", 0xC1, 12, False),
    ("hierarchical", 0xC5, 8, False)])
def test_jpeg_info_reports_the_frame_type_and_precision_that_decide_the_decoder(kind, frame, precision, nvjpeg):
    import skimage.data

    coffee = skimage.data.coffee()[:64, :96]
    made = {"baseline": lambda: jpeg(coffee), "progressive": lambda: jpeg(coffee, progressive=True),
            "hierarchical": lambda: _hierarchical(jpeg(coffee))}
    data = made[kind]() if kind in made else (JPEG_KINDS / f"{kind}.jpg").read_bytes()
    info = tp.jpeg_info(data)
    assert (info.components, info.frame, info.precision) == (3, frame, precision)
    assert info.nvjpeg is nvjpeg
    assert not tp.JpegInfo(components=4).nvjpeg, "CMYK goes to PIL whatever its frame"


@pytest.mark.parametrize("kind", ["arithmetic", "arithmetic_progressive", "lossless"])
def test_jpeg_kinds_nvjpeg_lacks_are_decoded_by_pil_like_the_reference_and_the_cpu_profile(kind, monkeypatch):
    # nvJPEG has no arithmetic decoding and no lossless process: on a GPU, decode_jpeg would refuse these.
    # They go to PIL (libjpeg-turbo) without trying it; the cpu profile's DALI decodes them too.
    import torchvision.io
    from PIL import Image

    from tritonvision_server.pipeline import CpuPreprocessor

    data = (JPEG_KINDS / f"{kind}.jpg").read_bytes()
    calls = []
    real = torchvision.io.decode_jpeg
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda *a, **k: calls.append(a) or real(*a, **k))
    (decoded,) = tp.decode([np.frombuffer(data, np.uint8)], "cpu")
    assert calls == [], "routed to PIL, not to decode_jpeg"
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(decoded.numpy(), expected)
    pixels = tp.preprocess([decoded], "cpu").numpy()
    assert np.abs(pixels[0] - torchvision_pixels(data)).max() <= GREY_LEVEL + 1e-5
    dali = CpuPreprocessor(max_batch_size=1, num_threads=1)([np.frombuffer(data, np.uint8)])
    assert np.abs(pixels - dali).max() <= GREY_LEVEL + 1e-5


def test_arithmetic_coding_decodes_to_the_pixels_of_the_huffman_jpeg_it_was_transcoded_from():
    # jpegtran -arithmetic re-codes the coefficients only: a decoder that misread the arithmetic scans (or
    # decoded the first of the progressive ones only) would differ from the Huffman-coded original.
    rows = [np.frombuffer((JPEG_KINDS / f"{k}.jpg").read_bytes(), np.uint8)
            for k in ("huffman", "arithmetic", "arithmetic_progressive")]
    assert tp.jpeg_info(rows[0].tobytes()).nvjpeg
    huffman, sequential, progressive = tp.decode(rows, "cpu")
    assert tuple(huffman.shape) == (3, 96, 128) and float(huffman.float().std()) > 10, "a photo, not a flat image"
    assert torch.equal(sequential, huffman) and torch.equal(progressive, huffman)


def test_a_twelve_bit_jpeg_fails_alone_as_in_the_reference_and_the_cpu_profile(photos):
    # No decoder of the three profiles takes 12-bit samples (Pillow and DALI use libjpeg-turbo's 8-bit API,
    # nvJPEG has none): the image is refused, the others in its batch decode.
    from PIL import Image

    from tritonvision_server.pipeline import CpuPreprocessor, DecodeError

    twelve = (JPEG_KINDS / "twelve_bit.jpg").read_bytes()
    good = photos["chelsea"]
    out = tp.decode([np.frombuffer(d, np.uint8) for d in (good, twelve, good)], "cpu")
    assert [isinstance(o, tp.DecodeFailed) for o in out] == [False, True, False]
    assert torch.equal(out[0], out[2])
    with pytest.raises(OSError):
        Image.open(io.BytesIO(twelve)).convert("RGB")
    with pytest.raises(DecodeError):
        CpuPreprocessor(max_batch_size=1, num_threads=1)([np.frombuffer(twelve, np.uint8)])


def test_a_jpeg_decode_jpeg_refuses_is_decoded_by_pil_alone_and_upright(photos, odd_photos, monkeypatch, caplog):
    # nvJPEG refuses some JPEGs that libjpeg-turbo decodes (chroma sampling factors it does not know). Here
    # decode_jpeg refuses one EXIF-rotated JPEG as nvJPEG would: the batched call fails, each JPEG is retried
    # alone, and the refused one goes to PIL. The same code runs after a failed batch on CUDA.
    import logging

    import torchvision.io
    from PIL import Image, ImageOps

    refused = odd_photos["exif_rotated"]
    names = ["chelsea", "refused", "broken", "coffee"]
    data = {**photos, "refused": refused, "broken": undecodable_jpeg(photos["chelsea"])}
    real, calls = torchvision.io.decode_jpeg, []

    def decode_jpeg(image, *args, **kwargs):
        calls.append(bytes(image.numpy()))
        if bytes(image.numpy()) == refused:
            raise RuntimeError("Unknown chroma subsampling")
        return real(image, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    with caplog.at_level(logging.DEBUG, logger=tp.log.name):
        out = tp.decode([np.frombuffer(data[n], np.uint8) for n in names], "cpu")
    assert isinstance(out[2], tp.DecodeFailed) and "could not decode the JPEG image" in str(out[2])
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(refused))).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(out[1].numpy(), upright), "PIL's decode, turned once (not again by orient)"
    for k in (0, 3):  # the others are decode_jpeg's, as without the refusal
        assert torch.equal(out[k], real(torch.frombuffer(bytearray(data[names[k]]), dtype=torch.uint8)))
    assert calls.count(refused) == 2, "the batch, then the retry alone; PIL after that"
    warnings_ = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_) == 1 and "PIL decoded" in warnings_[0].getMessage()
    assert any(r.levelno == logging.DEBUG and "undecodable JPEG" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_a_16_bit_greyscale_image_decodes_as_the_other_profiles_decode_it(fmt):
    # PIL opens these as mode I;16, whose convert("RGB") clips at 255: a full-range 16-bit photo came out
    # almost all white. DALI (cpu and gpu profiles) scales 16 bits to 8; the fallback decoder does the same.
    from PIL import Image

    from tritonvision_server.pipeline import CpuPreprocessor

    ramp = np.linspace(0, 65535, 200 * 300).reshape(200, 300)
    noise = np.random.default_rng(0).integers(0, 300, ramp.shape)
    buf = io.BytesIO()
    Image.fromarray((ramp + noise).clip(0, 65535).astype(np.uint16)).save(buf, format=fmt)
    data = np.frombuffer(buf.getvalue(), np.uint8)
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I;16")
    (decoded,) = tp.decode([data], "cpu")
    assert float((decoded == 255).float().mean()) < 0.05  # the ramp's top few percent, not the whole image
    pixels = tp.preprocess([decoded], "cpu").numpy()
    dali = CpuPreprocessor(max_batch_size=1, num_threads=1)([data])
    assert np.abs(pixels - dali).max() <= GREY_LEVEL + 1e-5


def test_an_undecodable_image_fails_only_its_own_slot(photos):
    good = photos["chelsea"]
    rows = [good, undecodable_jpeg(good), b"\x89PNG\r\n\x1a\n" + b"\0" * 40, good]
    out = tp.decode([np.frombuffer(r, np.uint8) for r in rows], "cpu")
    assert [isinstance(o, tp.DecodeFailed) for o in out] == [False, True, True, False]
    assert torch.equal(out[0], out[3]) and out[0].shape == (3, 300, 451)


def test_a_batch_is_decoded_and_resized_in_runs_within_the_pixel_budget(photos, monkeypatch):
    # One decode call per run, each run's images resized before the next run is decoded: decoded images of
    # one run at a time, not of the whole batch (the CUDA caching allocator would keep the batch's peak).
    names = ["chelsea", "coffee", "bad", "chelsea", "astronaut"]
    data = {**photos, "bad": undecodable_jpeg(photos["chelsea"])}
    rows = [np.frombuffer(data[n], np.uint8) for n in names]
    sizes = [451 * 300, 600 * 400, 451 * 300, 451 * 300, 512 * 512]
    decode, calls = tp.decode, []
    monkeypatch.setattr(tp, "decode", lambda batch, device: calls.append(len(batch)) or decode(batch, device))
    with torch.inference_mode():
        pixels, where = tp.preprocess_runs(rows, sizes, "cpu", tp.Normaliser("cpu", torch.float32), budget=300_000)
    assert calls == [1, 1, 2, 1]  # [chelsea] [coffee] [bad, chelsea] [astronaut], each within 0.3 MP
    assert isinstance(where[2], tp.DecodeFailed)
    good = [k for k in range(len(rows)) if k != 2]
    assert [where[k] for k in good] == [0, 1, 2, 3] and pixels.shape == (4, 3, 224, 224)
    expected = tp.preprocess(decode([rows[k] for k in good], "cpu"), "cpu")
    assert torch.equal(pixels, expected)
    # With the spec's budget (one largest image) these photos are one run, as before the budget.
    calls.clear()
    tp.preprocess_runs(rows, sizes, "cpu", tp.Normaliser("cpu", torch.float32))
    assert calls == [len(rows)]


@pytest.mark.parametrize(("n", "expected"), [(1, 1), (2, 4), (4, 4), (5, 8), (8, 8), (9, 8)])
def test_a_batch_runs_on_the_smallest_captured_size_that_holds_it(n, expected):
    assert tp.graph_batch_size(n, (8, 1, 4)) == expected


def test_graph_runner_pads_to_the_next_size_and_chunks_beyond_the_largest():
    seen = []

    def fn(x):  # a stand-in model: records the batch it is given, scores = per-image pixel sums
        seen.append(x.shape[0])
        return x.flatten(1).sum(dim=1, keepdim=True).expand(-1, spec.NUM_CLASSES)

    runner = tp.GraphRunner(fn, (1, 4, 8), device="cpu")
    x = torch.rand(19, 3, 224, 224)
    out = runner(x)
    assert seen == [8, 8, 4], "19 images: two chunks of the largest size, then 3 padded to 4"
    assert runner.padded_images == 1
    assert torch.allclose(out[:, 0], x.flatten(1).sum(dim=1), rtol=1e-5)
    seen.clear()
    assert runner(x[:1]).shape == (1, spec.NUM_CLASSES) and seen == [1]
    # Without sizes (the CPU serving path) a batch runs as it comes.
    seen.clear()
    tp.GraphRunner(fn, (), device="cpu")(x[:5])
    assert seen == [5]


def test_model_step_scores_equal_the_onnx_export_of_the_same_weights(onnx_path, tmp_path, photos):
    from reference import reference_scores

    from tritonvision_server.onnx_export import export_state_dict

    state = export_state_dict(tmp_path / "resnet50.pt", "random:0")
    model, dtype = tp.load_resnet50(state, "cpu", "fp16")
    assert dtype == torch.float32, "the CPU runs the model in FP32 whatever the precision"
    pixels = torch.from_numpy(torchvision_pixels(photos["chelsea"]))[None]
    with torch.inference_mode():
        scores = model(pixels)[0].numpy()
    assert np.allclose(scores, reference_scores(onnx_path, photos["chelsea"]), atol=1e-5)
    assert abs(float(scores.sum()) - 1.0) < 1e-4


def test_without_cuda_the_device_error_names_the_cpu_override():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="--torch-device cpu"):
        tp.device_for("cuda")
    assert tp.device_for("cpu") == torch.device("cpu")


# Chroma upsampling. libjpeg-turbo (PIL, the cpu profile's DALI, decode_jpeg on the CPU) upsamples the
# subsampled chroma of a 4:2:0 JPEG with its "fancy" triangle filter; DALI's GPU decoder does the same
# (jpeg_fancy_upsampling). nvJPEG interpolates only when its handle is created with
# NVJPEG_FLAGS_UPSAMPLING_WITH_INTERPOLATION, and torchvision's GPU decode_jpeg creates it with
# NVJPEG_FLAGS_DEFAULT and offers no option: on a GPU, chroma is replicated. libjpeg-turbo replicates too when
# asked (simplejpeg's fastupsample), which measures the effect here. After resize and crop, on the test photos:
# 8-20 grey levels at most (at sharp colour edges), 0.22-0.57 on average, more than 3 levels for 0.2-2.3% of
# the values; 4:4:4 and greyscale JPEGs are not affected. Top-5 classes unchanged, scores within 3e-4.
CHROMA_MAX_GREY_LEVELS = 20


def _colour_jpegs(photos: dict[str, bytes]) -> list[str]:
    """Names of the 3-component JPEGs (4:2:0 in the fixtures, Pillow's default)."""
    return sorted(n for n in photos if tp.jpeg_info(photos[n]).components == 3)


def _replicated_chroma(data: bytes):
    """``data`` decoded by libjpeg-turbo with its chroma replicated (no interpolation), upright."""
    import simplejpeg

    array = simplejpeg.decode_jpeg(data, colorspace="RGB", fastupsample=True)
    return tp.orient(torch.from_numpy(array.copy()).permute(2, 0, 1), tp.jpeg_info(data).orientation)


def test_replicated_chroma_as_on_the_gpu_moves_subsampled_pixels_by_grey_levels_but_not_the_top5(odd_photos,
                                                                                                tmp_path):
    import simplejpeg
    import skimage.data

    from tritonvision_server.onnx_export import export_state_dict

    photos = {**odd_photos, "coffee_444": jpeg(skimage.data.coffee(), subsampling=0)}
    names = _colour_jpegs(photos)
    fancy = tp.decode([np.frombuffer(photos[n], np.uint8) for n in names], "cpu")
    replicated = [_replicated_chroma(photos[n]) for n in names]
    for n, f in zip(names, fancy):  # the flag is the only difference: without it simplejpeg decodes as we do
        array = simplejpeg.decode_jpeg(photos[n], colorspace="RGB")
        assert torch.equal(tp.orient(torch.from_numpy(array.copy()).permute(2, 0, 1), tp.jpeg_info(photos[n]).orientation), f)
    a, b = tp.resize_crop(fancy), tp.resize_crop(replicated)
    diff = (a - b).abs().flatten(1)
    table = {n: (int(d.max()), round(float(d.mean()), 3)) for n, d in zip(names, diff)}
    print(f"fancy vs replicated chroma after resize and crop, grey levels (max, mean): {table}")
    assert table["coffee_444"] == (0, 0.0), "4:4:4 has no chroma to upsample"
    others = [n for n in names if n != "coffee_444"]
    assert all(table[n][0] > 3 for n in others), "4:2:0 photos move by more than the strict GPU tolerance"
    assert max(table[n][0] for n in others) <= CHROMA_MAX_GREY_LEVELS
    assert all(table[n][1] < 0.6 for n in others)
    greyscale = tp.decode([np.frombuffer(photos["greyscale"], np.uint8)], "cpu")[0]
    assert torch.equal(greyscale, torch.from_numpy(simplejpeg.decode_jpeg(photos["greyscale"], colorspace="RGB",
                                                                          fastupsample=True).copy()).permute(2, 0, 1))
    model, _ = tp.load_resnet50(export_state_dict(tmp_path / "r.pt", "random:0"), "cpu")
    normalise = tp.Normaliser("cpu", torch.float32)
    with torch.inference_mode():
        sa, sb = model(normalise(a)), model(normalise(b))
    assert torch.equal(sa.topk(5).indices, sb.topk(5).indices)
    # Within the end-to-end GPU test's tolerance on the top score (test_gpu_torch.py).
    assert float((sa - sb).abs().max()) <= 2e-3


@pytest.mark.gpu
def test_cuda_decode_matches_the_cpu_within_three_grey_levels_where_no_chroma_is_upsampled():
    import skimage.data

    photos = {n: jpeg(getattr(skimage.data, n)(), subsampling=0) for n in ("chelsea", "coffee", "astronaut", "rocket")}
    photos["greyscale"] = jpeg(skimage.data.astronaut(), mode="L")
    rows = [np.frombuffer(photos[n], np.uint8) for n in sorted(photos)]
    gpu = tp.resize_crop(tp.decode(rows, "cuda")).cpu()
    cpu = tp.resize_crop(tp.decode(rows, "cpu"))
    diff = (gpu - cpu).abs()
    print(f"4:4:4 and greyscale, nvJPEG vs libjpeg-turbo: max {float(diff.max())}, mean {float(diff.mean()):.3f} grey levels")
    # nvJPEG's IDCT and colour conversion against libjpeg-turbo's.
    assert diff.max() <= 3
    assert diff.mean() < 0.5


@pytest.mark.gpu
def test_cuda_decode_of_subsampled_jpegs_matches_libjpeg_with_replicated_chroma(odd_photos):
    names = _colour_jpegs(odd_photos)
    gpu = tp.resize_crop(tp.decode([np.frombuffer(odd_photos[n], np.uint8) for n in names], "cuda")).cpu()
    replicated = tp.resize_crop([_replicated_chroma(odd_photos[n]) for n in names])
    fancy = tp.resize_crop(tp.decode([np.frombuffer(odd_photos[n], np.uint8) for n in names], "cpu"))
    d_rep, d_fancy = (gpu - replicated).abs(), (gpu - fancy).abs()
    print(f"nvJPEG vs replicated chroma: max {float(d_rep.max())}, mean {float(d_rep.mean()):.3f}; "
          f"vs fancy (the reference): max {float(d_fancy.max())}, mean {float(d_fancy.mean()):.3f} grey levels")
    assert d_rep.max() <= 3 and d_rep.mean() < 0.5  # the IDCT's share, as for 4:4:4
    assert d_fancy.max() <= CHROMA_MAX_GREY_LEVELS + 3


@pytest.mark.gpu
def test_cuda_decode_takes_the_jpeg_kinds_nvjpeg_lacks_through_pil():
    kinds = ["huffman", "arithmetic", "arithmetic_progressive", "lossless", "twelve_bit"]
    rows = [np.frombuffer((JPEG_KINDS / f"{k}.jpg").read_bytes(), np.uint8) for k in kinds]
    gpu, cpu = tp.decode(rows, "cuda"), tp.decode(rows, "cpu")
    assert isinstance(gpu[4], tp.DecodeFailed) and isinstance(cpu[4], tp.DecodeFailed)
    assert all(g.device.type == "cuda" for g in gpu[:4])
    for k in (1, 2, 3):  # PIL on both
        assert torch.equal(gpu[k].cpu(), cpu[k])
    nvjpeg = (tp.resize_crop([gpu[0]]).cpu() - tp.resize_crop([cpu[0]])).abs()  # nvJPEG against libjpeg-turbo
    assert gpu[0].shape == cpu[0].shape and nvjpeg.max() <= CHROMA_MAX_GREY_LEVELS + 3


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager_fp16_model(tmp_path):
    from tritonvision_server.onnx_export import export_state_dict

    model, dtype = tp.load_resnet50(export_state_dict(tmp_path / "r.pt", "random:0"), "cuda", "fp16")
    runner = tp.GraphRunner(model, (1, 4, 8), device="cuda", input_dtype=dtype)
    assert sorted(runner.graphs) == [1, 4, 8]
    x = torch.randn(11, 3, 224, 224, device="cuda", dtype=dtype)
    with torch.inference_mode():
        eager = model(x)
    assert torch.allclose(runner(x), eager, atol=2e-3)


# Run in a fresh interpreter, as the stub runs the step: what a process keeps must not depend on pytest's own
# handling of warnings (it records them per test, with filters of its own).
_REGISTRY_PROBE = r"""
import json, sys
import numpy as np
from tritonvision_server import torch_pipeline as tp

def entries():
    # Python keeps each distinct warning text a module issued in that module's __warningregistry__.
    return sum(len([k for k in vars(m).get("__warningregistry__", {}) if k != "version"])
               for m in list(sys.modules.values()) if hasattr(m, "__dict__"))

import io
from PIL import Image

def encoded(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, fmt)
    return np.frombuffer(buf.getvalue(), np.uint8)

tp.decode([encoded("PNG"), encoded("TIFF")], "cpu")  # the decoders' modules imported before counting
rows = [np.fromfile(path, np.uint8) for path in sys.argv[1:]]
before = entries()
outcomes = [type(o).__name__ for o in tp.decode(rows, "cpu")]
print(json.dumps({"before": before, "after": entries(), "outcomes": outcomes}))
"""


def _png_claiming(width: int, height: int) -> bytes:
    """An 8x8 PNG whose header claims ``width`` x ``height``: PIL opens it, then fails as truncated."""
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _tiff_with_oversized_tag(tag: int) -> bytes:
    """An 8x8 TIFF with one private tag whose declared data runs past the end of the file (PIL skips it)."""
    import struct

    from PIL import Image, TiffImagePlugin, TiffTags

    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[tag] = b"abcdefgh"
    info.tagtype[tag] = TiffTags.UNDEFINED
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, "TIFF", tiffinfo=info)
    data = bytearray(buf.getvalue())
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        if struct.unpack_from("<H", data, entry)[0] == tag:
            struct.pack_into("<I", data, entry + 4, 1 << 28)
            return bytes(data)
    raise AssertionError(f"tag {tag} not written")


def test_decoder_warnings_about_hostile_files_are_not_kept_one_per_distinct_file(tmp_path):
    # PIL warns about images over its own pixel limit (89.5 MP, under the spec's 120 MP) and about damaged
    # TIFF tags with the file's own numbers in the text; Python keeps every distinct text for the life of the
    # process (~280 bytes each) and logs it, so a client sending ever-new numbers could grow the step's memory
    # and the server log without end.
    rows = [_png_claiming(10_000, 9_000 + k) for k in range(8)] + [_tiff_with_oversized_tag(40_000 + k)
                                                                   for k in range(8)]
    assert all(89_478_485 < 10_000 * (9_000 + k) <= spec.IMAGE_LIMITS.max_pixels for k in range(8))
    paths = []
    for i, data in enumerate(rows):
        paths.append(tmp_path / f"{i}.bin")
        paths[-1].write_bytes(data)
    proc = subprocess.run([sys.executable, "-c", _REGISTRY_PROBE, *map(str, paths)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["outcomes"] == ["DecodeFailed"] * 8 + ["Tensor"] * 8, result
    assert result["after"] == result["before"], result
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]


def _png_damaged_near_the_end(width: int, height: int) -> bytes:
    """A one-colour PNG whose compressed data is zeroed near its end: PIL decodes most rows, then fails."""
    import struct
    import zlib

    raw = zlib.compress(b"".join(b"\0" + bytes([7]) * (3 * width) for _ in range(height)), 9)
    raw = raw[:-50] + bytes(50)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def test_a_failed_decode_leaves_nothing_for_the_garbage_collector_to_free():
    # Whatever a failed decode allocated (PIL's partly decoded image) must go when its batch's results go, not
    # wait in a reference cycle for the garbage collector, which may not run for many batches.
    import gc

    from PIL import Image

    rows = [np.frombuffer(_png_damaged_near_the_end(1000, 1200), np.uint8)]
    normalise = tp.Normaliser("cpu", torch.float32)
    tp.preprocess_runs(rows, [1000 * 1200], "cpu", normalise)  # imports done first: they leave cycles of their own
    gc.collect()
    gc.disable()
    try:
        out, where = tp.preprocess_runs(rows, [1000 * 1200], "cpu", normalise)
        assert out is None and isinstance(where[0], tp.DecodeFailed), where
        assert "could not decode the image" in str(where[0])
        del out, where
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        kept = [o for o in gc.garbage if isinstance(o, (BaseException, Image.Image))
                or (type(o).__name__ == "frame" and o.f_code.co_filename == tp.__file__)]
        assert not kept, kept
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
