"""Helpers shared by the python-backend models (imported only inside the Triton stub)."""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

from tritonvision.spec import refusal_message


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


def decode_error_message(fmt: str) -> str:
    # The decoders' own exceptions name only an operator or a sample index, nothing a client can act on.
    return f"could not decode the {fmt.upper()} image: the data is corrupt or truncated"


def refusal(reason: str, detail: str):
    """The error response of a refused image (INVALID_ARGUMENT, ``image refused (<reason>): <detail>``),
    counted in ``tritonvision_refused_images_total``. The message's fixed start lets a client that gets no
    status code (a stream response) tell it from a server failure without sending the image again."""
    count_refusal(reason)
    return error_response(refusal_message(reason, detail))


def error_response(message: str, *, invalid_argument: bool = True):
    """An error response: INVALID_ARGUMENT for the request's own fault, else INTERNAL."""
    # TritonError codes reach the client as the matching gRPC status (INVALID_ARGUMENT for bad input).
    code = pb_utils.TritonError.INVALID_ARG if invalid_argument else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
