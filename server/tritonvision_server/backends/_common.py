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


def error_response(message: str, *, invalid_argument: bool = True):
    # TritonError codes reach the client as the matching gRPC status (INVALID_ARGUMENT for bad input).
    code = pb_utils.TritonError.INVALID_ARG if invalid_argument else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
