"""What users install: the built wheel, in a clean virtual environment, not the editable checkout.

``make wheel-venv`` (part of ``make test``) builds the wheel and installs it, with only its required
dependencies, into its own environment; these tests run that environment's Python and scripts from a
folder outside the checkout, so nothing resolves to the source tree.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tritonvision import spec

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "model_repository"


@pytest.fixture(scope="module")
def wheel_venv() -> Path:
    venv = Path(os.environ.get("TRITONVISION_WHEEL_VENV", ROOT / ".venv-wheel"))
    if not (venv / ".installed").exists():
        if "TRITONVISION_WHEEL_VENV" in os.environ:
            pytest.fail(f"no wheel environment at {venv}: run `make wheel-venv`")
        pytest.skip(f"no wheel environment at {venv}; `make wheel-venv` builds it (`make test` does)")
    return venv


def _run(venv: Path, *cmd: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_installs_the_sdk_and_server_packages_with_their_data(wheel_venv, tmp_path):
    code = (
        "import json, tritonvision, tritonvision_server, tritonvision._transport\n"
        "from tritonvision import Classifier, AsyncClassifier\n"
        "from tritonvision import sample_images\n"
        "from tritonvision_server import configs, imagecheck, repocheck, pipeline\n"
        "print(json.dumps({'sdk': tritonvision.__file__, 'server': tritonvision_server.__file__,\n"
        "  'samples': [p.name for p in sample_images()], 'labels': len(configs.labels()),\n"
        "  'warmup': configs.WARMUP_LARGE_SOURCE.stat().st_size}))"
    )
    out = json.loads(_run(wheel_venv, str(wheel_venv / "bin" / "python"), "-c", code, cwd=tmp_path).stdout)
    site = str(wheel_venv / "lib")
    assert out["sdk"].startswith(site) and out["server"].startswith(site), out  # the wheel, not the checkout
    assert out["samples"] == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"]
    assert out["labels"] == spec.NUM_CLASSES and out["warmup"] > 100_000


def test_wheel_cli_entry_points_answer_help(wheel_venv, tmp_path):
    assert "classify" in _run(wheel_venv, str(wheel_venv / "bin" / "tritonvision"), "--help", cwd=tmp_path).stdout
    assert "configs" in _run(wheel_venv, str(wheel_venv / "bin" / "build_engines.py"), "--help", cwd=tmp_path).stdout


def test_build_script_renders_the_committed_gpu_repository_from_the_installed_package(wheel_venv, tmp_path):
    python = str(wheel_venv / "bin" / "python")
    _run(wheel_venv, python, str(ROOT / "build_engines.py"), "configs", "--output", str(tmp_path / "repo"), cwd=tmp_path)
    generated = sorted(p.relative_to(tmp_path / "repo") for p in (tmp_path / "repo").rglob("*") if p.is_file())
    assert Path("preprocess/1/dali.py") in generated and Path("preprocess/warmup/photo_12mp.jpg") in generated
    for rel in generated:
        assert (tmp_path / "repo" / rel).read_bytes() == (COMMITTED / rel).read_bytes(), rel
    _run(wheel_venv, python, str(ROOT / "build_engines.py"), "check", str(tmp_path / "repo"), cwd=tmp_path)
    # ... and check finds what is wrong, from the installed package too.
    (tmp_path / "repo" / "resnet50" / "labels.txt").write_text("only one class\n")
    broken = _run(wheel_venv, python, str(ROOT / "build_engines.py"), "check", str(tmp_path / "repo"), cwd=tmp_path, check=False)
    assert broken.returncode == 1 and "[labels] resnet50" in broken.stderr


def test_missing_extras_are_named_by_the_installed_package(wheel_venv, tmp_path):
    # The wheel's required dependencies are the SDK's; building the ONNX file needs the build extra.
    proc = _run(wheel_venv, str(wheel_venv / "bin" / "build_engines.py"), "onnx", "--weights", "random:0",
                "--output", str(tmp_path / "m.onnx"), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "[build]" in proc.stderr, proc.stderr[-2000:]


def test_installed_cli_classifies_the_shipped_samples_against_the_real_server(wheel_venv, grpc_url, tmp_path):
    out = _run(wheel_venv, str(wheel_venv / "bin" / "tritonvision"), "classify", "--url", grpc_url, "--json",
               "--top-k", "3", cwd=tmp_path, *_sample_args(wheel_venv, tmp_path))
    results = json.loads(out.stdout)
    assert len(results) == 3, out.stdout[-2000:]
    for result in results:
        assert len(result["predictions"]) == 3 and result["predictions"][0]["label"], result


def _sample_args(venv: Path, cwd: Path) -> list[str]:
    code = "from tritonvision import sample_images; print('\\n'.join(map(str, sample_images())))"
    return _run(venv, str(venv / "bin" / "python"), "-c", code, cwd=cwd).stdout.split()
