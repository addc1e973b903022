"""Export torchvision's ResNet-50 (plus softmax) to ONNX with a dynamic batch axis.

The same ONNX file feeds ONNX Runtime in the cpu profile, the fp32/tf32 engine builds of the gpu profile,
and the FP16 and INT8 files made from it (:mod:`tritonvision_server.precision`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tritonvision.spec import PREPROCESSING, SCORES, PIXELS

from tritonvision.extras import require

log = logging.getLogger(__name__)

DEFAULT_SEED = 0
OPSET = 17
RANDOM_FC_SCALE = 50.0
# Bump when the export changes, so older files are rebuilt.
EXPORT_VERSION = 3  # 3: the sidecar records the precision and input dtype


@dataclass(frozen=True)
class Weights:
    """Where the weights come from: ``imagenet``, ``random[:SEED]`` or a path to a state_dict."""

    kind: str  # "imagenet" | "random" | "file"
    seed: int = DEFAULT_SEED
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> "Weights":
        if text == "imagenet":
            return cls("imagenet")
        m = re.fullmatch(r"random(?::(\d+))?", text)
        if m:
            return cls("random", seed=int(m.group(1) or DEFAULT_SEED))
        if Path(text).is_file():
            return cls("file", path=str(Path(text).resolve()))
        raise ValueError(f"weights must be 'imagenet', 'random[:SEED]' or an existing state_dict file, got {text!r}")

    def __str__(self) -> str:
        return {"imagenet": "imagenet", "random": f"random:{self.seed}", "file": self.path}[self.kind]


class WeightsUnavailable(RuntimeError):
    """The ImageNet weights could not be downloaded and falling back to random weights was refused."""


def _model(weights: Weights, *, allow_random_fallback: bool = True):
    require("torch", extra="build", what="ONNX export")
    require("torchvision", extra="build", what="ONNX export")
    import torch
    from torchvision.models import ResNet50_Weights, resnet50

    if weights.kind == "imagenet":
        try:
            state = ResNet50_Weights.IMAGENET1K_V2.get_state_dict(progress=True)
            model = resnet50()
            model.load_state_dict(state)
            return model, weights
        except Exception as exc:  # no network, hub blocked, proxy...: fall back so serving still works
            if not allow_random_fallback:
                # An image build must fail here rather than ship a service that answers with random weights.
                raise WeightsUnavailable(
                    f"could not download the ImageNet weights ({type(exc).__name__}: {exc}) and random weights "
                    "were refused (--require-weights): build with internet access, or pass --weights PATH"
                ) from exc
            fallback = Weights("random", seed=DEFAULT_SEED)
            log.warning(
                "\n%s\nCOULD NOT DOWNLOAD the ImageNet weights (%s: %s).\nFalling back to RANDOM weights "
                "(%s): the service runs, but its predictions are meaningless.\nRun again online, or pass "
                "--weights PATH to a ResNet-50 state_dict.\n%s",
                "!" * 78, type(exc).__name__, exc, fallback, "!" * 78,
            )
            weights = fallback
    torch.manual_seed(weights.seed)
    if weights.kind == "file":
        model = resnet50()
        model.load_state_dict(torch.load(weights.path, map_location="cpu", weights_only=True))
        return model, weights
    # Default initialisation gives an untrained network whose activations grow block after block, so that
    # a one-grey-level rounding difference in the input moves its scores by 1e-3. Residual branches that
    # start at zero keep it well-conditioned like a trained one, and a scaled classifier spreads the softmax
    # (top scores ~0.01-0.06 instead of a flat 1/1000) so that comparisons of scores mean something.
    model = resnet50(zero_init_residual=True)
    with torch.no_grad():
        model.fc.weight.mul_(RANDOM_FC_SCALE)
        model.fc.bias.mul_(RANDOM_FC_SCALE)
    return model, weights


def _up_to_date(path: Path, weights: Weights) -> bool:
    """Whether ``path`` was written from ``weights`` by this exporter (its ``path.json`` says so)."""
    meta_path = path.with_suffix(path.suffix + ".json")
    if not (path.exists() and meta_path.exists()):
        return False
    meta = json.loads(meta_path.read_text())
    # An offline fallback to random weights is retried next time: "imagenet" is only up to date once real.
    if meta.get("weights") == str(weights) and meta.get("export_version") == EXPORT_VERSION:
        log.info("%s is up to date (weights %s); skipping", path, meta["weights"])
        return True
    return False


def _commit(tmp: Path, path: Path, requested: Weights, used: Weights, **meta) -> None:
    """Move a finished export into place and write ``path.json``, which :func:`_up_to_date` reads."""
    tmp.replace(path)
    record = {"requested": str(requested), "weights": str(used), **meta, "export_version": EXPORT_VERSION}
    path.with_suffix(path.suffix + ".json").write_text(json.dumps(record, indent=2))


def export_onnx(path: Path, weights: str | Weights = "random", *, force: bool = False,
                allow_random_fallback: bool = True) -> Path:
    """Write ``path`` (and ``path.json`` describing it) unless an export of the same weights exists."""
    path = Path(path)
    weights = Weights.parse(weights) if isinstance(weights, str) else weights
    if not force and _up_to_date(path, weights):
        return path
    torch = require("torch", extra="build", what="ONNX export")

    model, used = _model(weights, allow_random_fallback=allow_random_fallback)
    wrapped = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    crop = PREPROCESSING.crop
    dummy = torch.zeros(2, 3, crop, crop)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(
            wrapped,
            (dummy,),
            str(tmp),
            input_names=[PIXELS("FP32").name],
            output_names=[SCORES.name],
            dynamic_axes={PIXELS("FP32").name: {0: "batch"}, SCORES.name: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,  # the legacy exporter is 5x faster here and gives the same graph for ResNet-50
        )
    _commit(tmp, path, weights, used, precision="fp32", input_dtype="FP32", opset=OPSET)
    log.info("exported ResNet-50 (%s weights) to %s in %.1f s", used, path, time.perf_counter() - start)
    return path


def export_state_dict(path: Path, weights: str | Weights = "random", *, force: bool = False,
                      allow_random_fallback: bool = True) -> Path:
    """Write ResNet-50's state dict to ``path`` (and ``path.json``) from the same weights as :func:`export_onnx`
    (the gpu-torch profile loads it in PyTorch); skipped when a file of the same weights exists."""
    path = Path(path)
    weights = Weights.parse(weights) if isinstance(weights, str) else weights
    if not force and _up_to_date(path, weights):
        return path
    torch = require("torch", extra="build", what="the ResNet-50 state dict")
    model, used = _model(weights, allow_random_fallback=allow_random_fallback)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), str(tmp))
    _commit(tmp, path, weights, used)
    log.info("wrote ResNet-50's state dict (%s weights) to %s", used, path)
    return path
