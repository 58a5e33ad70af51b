"""Request and response bodies; they also make the OpenAPI schema served at /openapi.json."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

NESTED_ITEM = {"type": "array", "description": "one item: nested arrays of numbers of the model's input shape, "
                                               "or a flat array of all its values"}


class PredictRequest(BaseModel):
    """A batch given either as nested arrays (``inputs``) or as base64 PNG images (``images``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"inputs": [[[[0.0, 0.5], [1.0, 0.25]]]]}, {"images": ["iVBORw0KGgo..."]}]})

    inputs: list[list[Any]] | None = Field(
        None, json_schema_extra={"items": NESTED_ITEM},
        description="items of shape input_shape (see /metadata), raw values; image models take pixels in [0, 1]")
    images: list[str] | None = Field(
        None, description="base64 PNGs (optionally data: URLs) of exactly the model's height and width; "
                          "converted to its channel count")

    @model_validator(mode="after")
    def _one_kind(self) -> "PredictRequest":
        if (self.inputs is None) == (self.images is None):
            raise ValueError("send exactly one of 'inputs' (nested arrays) or 'images' (base64 PNGs)")
        return self


class Prediction(BaseModel):
    class_index: int
    class_name: str
    probabilities: list[float]


class PredictResponse(BaseModel):
    model: str = Field(description="registered model name (or file stem)")
    version: str | None = Field(description="registry version, null for a plain file")
    predictions: list[Prediction]


class ModelCard(BaseModel):
    """What /metadata reports: identity, input contract, and the metrics recorded at registration."""

    model_config = ConfigDict(protected_namespaces=(), frozen=True)

    name: str
    version: str | None
    alias: str | None
    uri: str
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    providers: tuple[str, ...]
    density: float | None = None
    acc: float | None = None
    cwv: float | None = None
    mcd: float | None = None
    worst_class: float | None = None
    dataset: str | None = None
    method: str | None = None
    model: str | None = Field(None, description="architecture name, e.g. mlp")
    granularity: str | None = Field(None, description="what pruning removed: 'weight' or 'unit'")
    onnx_format: str | None = Field(None, description="how the file stores the pruned model, e.g. 'dense', 'compact'")
    quantization: str | None = Field(None, description="INT8 quantization of the file: 'none', 'dynamic' or 'static'")
    file_bytes: int = Field(description="size of the ONNX file served, in bytes (measured by the service)")

    def label(self) -> str:
        """'NAME version V (alias A)' for messages and logs."""
        version = f" version {self.version}" if self.version else ""
        alias = f" (alias {self.alias})" if self.alias else ""
        return f"model '{self.name}'{version}{alias} from {self.uri}"


class MetadataResponse(ModelCard):
    """The model card plus the service's batch limit."""

    max_batch: int


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    model: str
    version: str | None


class ErrorBody(BaseModel):
    detail: str
