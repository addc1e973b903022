"""The transport's own protobuf requests and its parsing of Triton's classification output (no server)."""

from __future__ import annotations

import struct

import pytest
import tritonvision as tv
from tritonclient.grpc import service_pb2
from tritonvision._transport._errors import map_error
from tritonvision._transport._grpc import ShmInput, infer_request, predictions
from tritonvision.spec import IMAGE, SCORES


def classification_response(entries: list[bytes], *, name: str = SCORES.name) -> service_pb2.ModelInferResponse:
    """A response as Triton sends it over gRPC: a BYTES tensor of length-prefixed elements in raw contents."""
    response = service_pb2.ModelInferResponse(model_name="classifier")
    response.outputs.add(name="OTHER", datatype="FP32", shape=[1, 1])
    response.raw_output_contents.append(struct.pack("<f", 0.5))
    response.outputs.add(name=name, datatype="BYTES", shape=[1, len(entries)])
    response.raw_output_contents.append(b"".join(struct.pack("<I", len(e)) + e for e in entries))
    return response


def test_request_carries_the_image_bytes_as_a_1xn_uint8_tensor_and_asks_for_top_k():
    request = infer_request("classifier", b"\xff\xd8jpeg", 3, "7")
    assert request.model_name == "classifier" and request.id == "7"
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == (IMAGE.name, "UINT8", [1, 6])
    assert list(request.raw_input_contents) == [b"\xff\xd8jpeg"]
    (output,) = request.outputs
    assert output.name == SCORES.name and output.parameters["classification"].int64_param == 3


def test_shared_memory_request_names_the_region_and_sends_no_bytes():
    request = infer_request("classifier", ShmInput("region_1", 1234, offset=64), 5)
    (tensor,) = request.inputs
    assert list(tensor.shape) == [1, 1234]
    assert tensor.parameters["shared_memory_region"].string_param == "region_1"
    assert tensor.parameters["shared_memory_byte_size"].int64_param == 1234
    assert tensor.parameters["shared_memory_offset"].int64_param == 64
    assert len(request.raw_input_contents) == 0


def test_classification_strings_are_parsed_in_order_and_labels_may_contain_colons():
    response = classification_response([b"0.75:281:tabby, tabby cat", b"0.125:7:odd:label"])
    assert predictions(response) == [
        tv.Prediction(label="tabby, tabby cat", index=281, score=0.75),
        tv.Prediction(label="odd:label", index=7, score=0.125),
    ]


def test_parsing_agrees_with_tritonclient_as_numpy():
    import tritonclient.grpc as grpcclient

    entries = [f"{1 / (i + 2):.6f}:{i}:class_{i}".encode() for i in range(5)]
    response = classification_response(entries)
    expected = [tv.Prediction.parse(e) for e in grpcclient.InferResult(response).as_numpy(SCORES.name).reshape(-1)]
    assert predictions(response) == expected


@pytest.mark.parametrize(
    "response",
    [
        classification_response([b"0.5:1:a"], name="NOT_SCORES"),
        service_pb2.ModelInferResponse(
            outputs=[service_pb2.ModelInferResponse.InferOutputTensor(name=SCORES.name, datatype="BYTES", shape=[1, 1])],
            raw_output_contents=[struct.pack("<I", 40) + b"0.5:1:a"],
        ),
    ],
    ids=["missing output", "truncated element"],
)
def test_malformed_response_is_an_sdk_error_without_status(response):
    with pytest.raises(ValueError) as info:
        predictions(response)
    error = map_error(info.value)
    assert type(error) is tv.TritonVisionError and error.status is None
