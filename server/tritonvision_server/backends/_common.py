"""Helpers shared by the python-backend models (imported only inside the Triton stub)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonvision.spec import refusal_message

from ..admission import ADMISSION_METRIC, DEFAULT_METRICS_URL, EXPIRED_MESSAGE, METRICS_URL_ENV, Admission

log = logging.getLogger(__name__)


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
_COUNTERS = {
    REFUSED_METRIC: "Images refused as the client's error (INVALID_ARGUMENT), by reason",
    ADMISSION_METRIC: "Requests refused undecoded by admission ahead of preprocessing (overload), by reason",
}
_families: dict[str, object] = {}
_metrics: dict[tuple[str, str], object] = {}


def count(name: str, reason: str) -> None:
    """Add one to the counter ``name{reason=...}`` (one of _COUNTERS)."""
    metric = _metrics.get((name, reason))
    if metric is None:
        family = _families.get(name)
        if family is None:
            # Every instance (a stub process each) registers the same family and labels; Triton keeps one
            # series per label set, which they all increment.
            family = _families[name] = pb_utils.MetricFamily(
                name=name, description=_COUNTERS[name], kind=pb_utils.MetricFamily.COUNTER)
        metric = _metrics[(name, reason)] = family.Metric(labels={"reason": reason})
    metric.increment(1)


def count_refusal(reason: str) -> None:
    """Add one to ``tritonvision_refused_images_total{reason=...}``."""
    count(REFUSED_METRIC, reason)


def decode_error_message(fmt: str) -> str:
    # The decoders' own exceptions name only an operator or a sample index, nothing a client can act on.
    # The header check has passed: the file is damaged past its header, or a kind of its format the decoder
    # does not take (a 32-bit integer TIFF, say), which the client should not be told is corrupt.
    return (f"could not decode the {fmt.upper()} image: the data is corrupt or truncated, or of a kind of "
            f"{fmt.upper()} the decoder does not support")


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


def admission(params: dict[str, str]) -> Admission | None:
    """The preprocess step's admission (tritonvision_server.admission) if its config asks for one and the
    launcher said where the server's metrics are; None otherwise (everything admitted, as before)."""
    limit = int(params.get("admission_limit", "0"))
    if not limit:
        return None
    # tritonvision serve and TritonServer set it; a tritonserver started by hand has its metrics on port 8002
    # unless told otherwise (a wrong URL is reported once the server is up, and admits everything).
    url = os.environ.get(METRICS_URL_ENV) or DEFAULT_METRICS_URL
    # A step without a queue timeout still holds a batch for at most a second.
    max_wait = int(params.get("admission_max_wait_us", "0")) / 1e6 or 1.0
    return Admission(url, params["admission_model"], limit, max_wait)


def scores_response(model, scores):
    """The response carrying a request's ``scores`` (numpy) from ``model`` (its ``input_name`` and
    ``output_name``), or an error where they are not finite: finite pixels far outside what preprocessing
    makes (a direct call with values near the float limit) overflow inside the network into NaN scores,
    which must not leave with OK."""
    if not np.isfinite(scores).all():
        return error_response(f"{model.output_name} came out NaN or infinite: {model.input_name} lies far outside "
                              "the range preprocessing produces")
    return pb_utils.InferenceResponse([pb_utils.Tensor(model.output_name, scores)])


def overloaded_response(message: str):
    """The response to a request refused for want of room downstream: UNAVAILABLE with Triton's own queue
    rejection text, which clients map to overload (the SDK's OverloadedError), not to a server failure."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.UNAVAILABLE))


def admit(gate: Admission, requests, images: dict[int, int], responses: list) -> list[int]:
    """Hold the batch until resnet50 can queue the requests ``images`` names (request index: the images it
    carries, in order); answer those refused (no room, or their own timeout ran out while held: surely
    expired, whatever they had waited before) in ``responses`` and return the indices that go on to be
    decoded, in order."""
    indices = list(images)
    admitted, held = gate.admit(list(images.values()))
    for i in indices[admitted:]:
        count(ADMISSION_METRIC, "overloaded")
        responses[i] = overloaded_response(gate.overloaded_message())
    kept = []
    for i in indices[:admitted]:
        timeout_us = requests[i].timeout() if held else 0
        if timeout_us and held * 1e6 >= timeout_us:
            count(ADMISSION_METRIC, "expired")
            responses[i] = overloaded_response(EXPIRED_MESSAGE)
        else:
            kept.append(i)
    return kept
