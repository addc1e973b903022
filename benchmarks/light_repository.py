"""Write the light variant of the cpu-profile repository (same configs, trivial compute) for benchmarks."""

from __future__ import annotations

from pathlib import Path

from tritonvision import spec
from tritonvision.spec import PREPROCESS, RESNET50
from tritonvision_server.configs import write_repository

_STUB = '''# The light benchmark variant (benchmarks/light_repository.py): trivial compute, same interface.
from tritonvision_server.backends.light import {cls} as TritonPythonModel  # noqa: F401
'''


def write_light_repository(dest: Path, label_names: list[str] | None = None) -> Path:
    """``configs.write_repository(spec.CPU, ...)`` with the steps' model code swapped for the light backend."""
    labels = label_names if label_names is not None else [f"class_{i}" for i in range(spec.NUM_CLASSES)]
    dest = write_repository(spec.CPU, Path(dest), onnx_path=None, label_names=labels)
    (dest / PREPROCESS / "1" / "model.py").write_text(_STUB.format(cls="LightPreprocess"))
    (dest / RESNET50 / "1" / "model.py").write_text(_STUB.format(cls="LightResNet50"))
    return dest
