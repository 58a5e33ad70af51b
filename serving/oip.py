"""The Open Inference Protocol (KServe v2) infer request and response, JSON and binary-tensor extension.

A request body is a JSON header, optionally followed by raw tensor bytes: the ``Inference-Header-Content-Length``
header gives the JSON's length and each binary input's ``parameters.binary_data_size`` its share of the rest.
Responses put outputs asked for with ``binary_data`` (or all, with ``parameters.binary_data_output``) after the
JSON the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from serving.errors import InputError
from serving.inputs import check_shape, from_float32_bytes, from_tensor_data, parse_count
from serving.responses import describe_validation, loads

HEADER_LENGTH = "Inference-Header-Content-Length"
DATATYPES = {"logits": "FP32", "probabilities": "FP32", "class_index": "INT64"}
NUMPY_TYPES = {"FP32": "<f4", "INT64": "<i8"}


class Parameters(BaseModel):
    """The parameters the service reads; others are accepted and ignored, as the protocol allows."""

    model_config = ConfigDict(extra="allow", strict=True)

    binary_data: StrictBool | None = None  # on an output: overrides binary_data_output either way
    binary_data_output: StrictBool = False
    binary_data_size: StrictInt | None = Field(None, ge=0)


class InputTensor(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str
    shape: list[StrictInt]
    datatype: str
    parameters: Parameters = Field(default_factory=Parameters)
    data: Any = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str
    parameters: Parameters = Field(default_factory=Parameters)


class InferRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    id: str | None = None
    parameters: Parameters = Field(default_factory=Parameters)
    inputs: list[InputTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


@dataclass(frozen=True)
class Decoded:
    """A decoded infer request: the batch, the outputs asked for (name -> binary?) and the request id."""

    batch: np.ndarray
    outputs: dict[str, bool]
    id: str | None


def decode_request(body: bytes, header_length: str | None, input_name: str, input_shape: tuple[int, ...],
                   max_batch: int) -> Decoded:
    """The batch and outputs of an infer request body; InputError (or BatchSizeError) saying what is wrong."""
    text, binary = _split(body, header_length)
    try:
        request = InferRequest.model_validate(loads(text))
    except json.JSONDecodeError as error:
        raise InputError(f"the inference request header is not valid JSON ({error.msg})") from None
    except ValidationError as error:
        raise InputError(describe_validation([{**e, "loc": ("body", *e["loc"])} for e in error.errors()])) from None
    if len(request.inputs) != 1 or request.inputs[0].name != input_name:
        names = [tensor.name for tensor in request.inputs]
        raise InputError(f"the model takes one input named '{input_name}'; the request has {names}")
    tensor = request.inputs[0]
    if tensor.datatype != "FP32":
        raise InputError(f"input '{input_name}' must have datatype FP32, not {tensor.datatype!r}")
    shape = check_shape(tensor.shape, input_shape, max_batch)
    size = tensor.parameters.binary_data_size
    if size is not None:
        if tensor.data is not None:
            raise InputError(f"input '{input_name}' has both 'data' and parameters.binary_data_size; send one")
        if size != len(binary):
            raise InputError(f"input '{input_name}' declares binary_data_size {size} but {len(binary)} bytes "
                             f"follow the {HEADER_LENGTH} JSON header")
        batch = from_float32_bytes(binary, shape)
    elif binary:
        raise InputError(f"{len(binary)} bytes follow the JSON header but no input declares binary_data_size")
    elif tensor.data is None:
        raise InputError(f"input '{input_name}' has neither 'data' nor parameters.binary_data_size")
    else:
        batch = from_tensor_data(tensor.data, shape)
    return Decoded(batch, _requested(request), request.id)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and a view of the binary data after it (not copied: the batch is a view of the body)."""
    if header_length is None:
        return body, memoryview(b"")
    length = parse_count(header_length)
    if length is None or length > len(body):
        raise InputError(f"{HEADER_LENGTH} must be a byte count within the body ({len(body)} bytes), "
                         f"got {header_length[:40]!r}")
    return body[:length], memoryview(body)[length:]


def _requested(request: InferRequest) -> dict[str, bool]:
    every_binary = request.parameters.binary_data_output
    if not request.outputs:  # none named (absent or an empty list): every output
        return {name: every_binary for name in DATATYPES}
    names = [o.name for o in request.outputs]
    unknown = sorted(set(names) - set(DATATYPES))
    if unknown:
        raise InputError(f"unknown output(s) {unknown}; the model has {list(DATATYPES)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"output(s) {repeated} requested more than once; name each output once")
    return {o.name: every_binary if o.parameters.binary_data is None else o.parameters.binary_data
            for o in request.outputs}


def encode_response(model_name: str, model_version: str, request_id: str | None,
                    tensors: dict[str, np.ndarray], binary: dict[str, bool]) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, followed by the binary outputs when any were asked for."""
    outputs, chunks = [], []
    for name, array in tensors.items():
        values = np.ascontiguousarray(array, dtype=NUMPY_TYPES[DATATYPES[name]])
        entry: dict[str, Any] = {"name": name, "datatype": DATATYPES[name], "shape": list(values.shape)}
        if binary[name]:
            chunks.append(values.tobytes())
            entry["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            entry["data"] = values.ravel()
        outputs.append(entry)
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": outputs}
    if request_id is not None:
        header["id"] = request_id
    text = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return text, {"Content-Type": "application/json"}
    return text + b"".join(chunks), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(text))}
