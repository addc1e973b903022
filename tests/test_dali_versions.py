"""The gpu profile's ``dali.py`` under every DALI release it supports, not only the one installed here.

The Triton DALI backend autoserialises ``preprocess/1/dali.py`` with the DALI of the server image (NGC
26.02: 1.53.0, 26.06: 2.1.1; the cpu profile runs 2.4). Each release runs in its own virtual environment
(``make dali-envs``, which ``make test`` builds), loads the committed file the way the backend does,
autoserialises the GPU pipeline without a GPU, and runs the same graph with the CPU decoder on awkward
photos, EXIF-rotated ones included. Every release must match torchvision, and the releases one another.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from image_helpers import orientation_exif
from reference import torchvision_pixels
from tritonvision import spec

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "dali_version_probe.py"
DALI_PY = ROOT / "model_repository" / spec.PREPROCESS / "1" / "dali.py"
# The oldest and newest DALI of the NGC tritonserver images supported (26.02 and 26.06).
SUPPORTED = ("1.53.0", "2.1.1")
# One grey level: torchvision (PIL) and DALI round the bilinear resize's output to 8 bits differently, so a
# pixel may land one level of 255 apart, never more; after normalisation that is 1/255/std, 0.0175 for the
# smallest std (0.224). Measured exactly that on every release checked, so the margin is float rounding.
TOLERANCE = 1.0 / 255 / min(spec.PREPROCESSING.std) + 1e-5


def _env_python(version: str) -> Path:
    root = Path(os.environ.get("TRITONVISION_DALI_ENVS", ROOT / ".venv-dali"))
    python = root / version / "bin" / "python"
    if not python.exists():
        if "TRITONVISION_DALI_ENVS" in os.environ:
            pytest.fail(f"no DALI {version} environment at {python.parent.parent}: run `make dali-envs`")
        pytest.skip(f"no DALI {version} environment at {python.parent.parent}; `make dali-envs` builds it "
                    "(`make test` does)")
    return python


def _jpeg(array: np.ndarray, orientation: int | None = None, mode: str | None = None) -> bytes:
    from PIL import Image

    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buf = io.BytesIO()
    kwargs = {"exif": orientation_exif(orientation)} if orientation else {}
    image.save(buf, format="JPEG", quality=92, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Phone photos in every EXIF orientation that turns them, odd sizes, greyscale and CMYK."""
    import skimage.data
    from PIL import Image

    coffee, chelsea, astronaut = skimage.data.coffee(), skimage.data.chelsea(), skimage.data.astronaut()
    folder = tmp_path_factory.mktemp("dali_versions")
    files = {
        "upright.jpg": _jpeg(coffee[:300, :451]),
        **{f"exif_{o}.jpg": _jpeg(coffee[:300, :451], orientation=o) for o in (3, 5, 6, 7, 8)},
        "odd_333x257.jpg": _jpeg(chelsea[:257, :333]),
        "tall_97x301.jpg": _jpeg(astronaut[:301, 200:297]),
        "greyscale.jpg": _jpeg(astronaut, mode="L"),
        "cmyk.jpg": _jpeg(chelsea, mode="CMYK"),
    }
    buf = io.BytesIO()
    Image.fromarray(astronaut[:200, :311]).save(buf, format="PNG")
    files["odd.png"] = buf.getvalue()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _probe(python: Path, images: Path, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), str(PROBE), str(DALI_PY), str(images), str(out)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=out.parent)
    assert proc.returncode == 0, f"the probe failed under {python}:\n{proc.stderr[-4000:]}"
    result = json.loads((out / "result.json").read_text())
    result["pixels"] = {n: np.load(out / f"{n}.npy") for n in result["images"]}
    return result


@pytest.fixture(scope="module")
def runs(images, tmp_path_factory) -> dict[str, dict]:
    """One probe run per supported release, plus the DALI of this environment (the cpu profile's)."""
    import nvidia.dali

    out = {}
    for version in SUPPORTED:
        out[version] = _probe(_env_python(version), images, tmp_path_factory.mktemp(f"dali_{version}"))
    out[nvidia.dali.__version__] = _probe(Path(sys.executable), images, tmp_path_factory.mktemp("dali_here"))
    return out


@pytest.mark.parametrize("version", SUPPORTED)
def test_each_supported_dali_autoserialises_the_committed_gpu_pipeline_without_a_gpu(runs, version):
    assert runs[version]["dali_version"] == version
    assert runs[version]["serialized_bytes"] > 10_000


@pytest.mark.parametrize("version", SUPPORTED)
def test_each_supported_dali_tells_the_gpu_decoder_to_upsample_chroma_as_the_cpu_one_does(runs, version):
    # The pixels above come from the CPU decoder (libjpeg-turbo's fancy upsampling, as PIL). DALI's GPU
    # decoders upsample chroma another way unless jpeg_fancy_upsampling is set (its default there is off),
    # so the GPU profile would answer with other colours than the ones these tests compare; the serialised
    # GPU pipeline must ask for it, and for the EXIF orientation (decoder and shape peek alike).
    bools = runs[version]["serialized_bools"]
    assert bools["jpeg_fancy_upsampling"] == [True], bools
    assert bools["adjust_orientation"] == [True, True], bools


@pytest.mark.parametrize("version", SUPPORTED)
def test_each_supported_dali_matches_torchvision_on_awkward_and_exif_rotated_photos(runs, images, version):
    diffs = {}
    for name, pixels in runs[version]["pixels"].items():
        diffs[name] = float(np.abs(pixels - torchvision_pixels((images / name).read_bytes())).max())
    print(f"DALI {version}: max abs diff vs torchvision per image {diffs}")
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOLERANCE, f"DALI {version}: {worst} differs by {diffs[worst]:.4f} (> {TOLERANCE:.4f}): {diffs}"


def test_every_dali_release_gives_identical_pixels_for_the_same_bytes(runs):
    # Bit for bit: the gpu profile's answer does not depend on which supported image runs it.
    versions = sorted(runs)
    first = runs[versions[0]]["pixels"]
    for version in versions[1:]:
        for name, pixels in runs[version]["pixels"].items():
            diff = float(np.abs(pixels - first[name]).max())
            assert np.array_equal(pixels, first[name]), f"{name}: DALI {version} and {versions[0]} differ by up to {diff:.5f}"


def test_rotated_photos_are_turned_upright_under_every_release(runs, images):
    # Guards the tests above: a release that ignored EXIF would classify the photo as stored, sideways.
    from PIL import Image

    for version, run in runs.items():
        for orientation in (5, 6, 7, 8):
            name = f"exif_{orientation}.jpg"
            as_stored = _jpeg(np.asarray(Image.open(images / name).convert("RGB")))
            assert np.abs(run["pixels"][name] - torchvision_pixels(as_stored)).max() > 0.5, (version, name)


@pytest.fixture(scope="module")
def rotated_webp(tmp_path_factory) -> Path:
    """The same photo as JPEG and as WebP, carrying the same EXIF orientation."""
    from PIL import Image
    import skimage.data

    photo = Image.fromarray(skimage.data.coffee()[:300, :451])
    folder = tmp_path_factory.mktemp("rotated_webp")
    for orientation in (3, 6, 8):
        for fmt, suffix in (("JPEG", "jpg"), ("WEBP", "webp")):
            photo.save(folder / f"exif_{orientation}.{suffix}", fmt, quality=95, exif=orientation_exif(orientation))
    return folder


def test_supported_dali_decode_a_rotated_webp_wrongly_which_is_why_validate_refuses_it(rotated_webp, tmp_path):
    """The gpu profile's validate step refuses WebP images with an EXIF orientation (backends/validate.py)
    because these releases decode them into pixels matching no orientation, while the same photo as JPEG is
    right. This fails once a supported release decodes them right: then the refusal can go."""
    import nvidia.dali

    releases = {v: _env_python(v) for v in SUPPORTED}
    releases[nvidia.dali.__version__] = Path(sys.executable)
    for version, python in releases.items():
        run = _probe(python, rotated_webp, tmp_path / version)
        for orientation in (3, 6, 8):
            diff = float(np.abs(run["pixels"][f"exif_{orientation}.webp"] - run["pixels"][f"exif_{orientation}.jpg"]).max())
            print(f"DALI {version}: orientation {orientation}: WebP vs JPEG max abs diff {diff:.3f}")
            if version in SUPPORTED:
                assert diff > 1.0, f"DALI {version} decodes a WebP with EXIF orientation {orientation} right now"
            else:  # the cpu profile's DALI: lossy WebP and JPEG of one photo differ by little
                assert diff < 0.5, f"DALI {version}: WebP with EXIF orientation {orientation} differs by {diff:.3f}"
