"""Helpers shared by the python-backend models (imported only inside the Triton stub)."""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils


def parameters(args: dict) -> tuple[dict, dict[str, str]]:
    """The model config and its string parameters."""
    config = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    return config, params


def output_dtype(config: dict, name: str):
    return pb_utils.triton_string_to_numpy(pb_utils.get_output_config_by_name(config, name)["data_type"])


# Refused images, by the step that refused them: a client's error, exported on Triton's metrics port next
# to nv_inference_request_failure, which counts them as failures of the ensemble like any server error.
REFUSED_METRIC = "tritonvision_refused_images_total"
# A request carrying this parameter asks again about an image the client already had refused (the SDK's
# stream learns the status code that way); it is not counted twice.
RECHECK_PARAMETER = "tritonvision_recheck"
_refused: dict[str, object] = {}
_family = None


def count_refusal(reason: str) -> None:
    """Add one to ``tritonvision_refused_images_total{reason=...}``."""
    global _family
    metric = _refused.get(reason)
    if metric is None:
        if _family is None:
            # Every instance (a stub process each) registers the same family and labels; Triton keeps one
            # series per label set, which they all increment.
            _family = pb_utils.MetricFamily(
                name=REFUSED_METRIC,
                description="Images refused as the client's error (INVALID_ARGUMENT), by reason",
                kind=pb_utils.MetricFamily.COUNTER,
            )
        metric = _refused[reason] = _family.Metric(labels={"reason": reason})
    metric.increment(1)


def is_recheck(request) -> bool:
    try:
        return bool(json.loads(request.parameters() or "{}").get(RECHECK_PARAMETER))
    except (AttributeError, ValueError):
        return False


def error_response(message: str, *, invalid_argument: bool = True, reason: str | None = None, request=None):
    """An error response; with ``reason``, a refused image counted in ``tritonvision_refused_images_total``
    (unless ``request`` is the SDK asking again about an image already refused)."""
    if invalid_argument and reason is not None and (request is None or not is_recheck(request)):
        count_refusal(reason)
    # TritonError codes reach the client as the matching gRPC status (INVALID_ARGUMENT for bad input).
    code = pb_utils.TritonError.INVALID_ARG if invalid_argument else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
