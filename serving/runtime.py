"""One ONNX Runtime session, the model card it serves, and batched prediction."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import numpy as np
import onnxruntime as ort

from serving.errors import InputError, ModelLoadError
from serving.model_size import model_bytes
from serving.model_source import ModelSource
from serving.schemas import ModelCard

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
NUMBER_KEYS = ("density", "acc", "cwv", "mcd", "worst_class")
TEXT_KEYS = ("dataset", "method", "model")
LIST_KEYS = ("class_names", "input_shape")
OPTIONAL_TEXT_KEYS = ("granularity", "onnx_format", "quantization")  # recorded by newer exports only; None when absent


def providers_for(device: str) -> list[str]:
    """Execution providers in priority order: CUDA first when available (``auto``) or demanded (``cuda``)."""
    if device == "cpu":
        return [CPU]
    has_cuda = CUDA in ort.get_available_providers()
    if device == "cuda" and not has_cuda:
        raise ModelLoadError("device 'cuda' asked for, but this onnxruntime build has no CUDAExecutionProvider "
                             "(install onnxruntime-gpu, or use device 'auto' / 'cpu')")
    return [CUDA, CPU] if has_cuda else [CPU]


def recorded_metadata(onnx_props: Mapping[str, str], tags: Mapping[str, str]) -> dict[str, Any]:
    """The contract's keys from the ONNX file's metadata_props (JSON values) and registry tags (strings).

    Registry tags win where both are present: they are what the registration recorded.
    """
    merged: dict[str, Any] = {}
    for source, props, is_tag in (("ONNX metadata", onnx_props, False), ("registry tag", tags, True)):
        for key in NUMBER_KEYS + TEXT_KEYS + OPTIONAL_TEXT_KEYS + LIST_KEYS:
            if key in props:
                merged[key] = _decode(key, props[key], is_tag, f"{source} '{key}'")
    return merged


def _decode(key: str, raw: str, is_tag: bool, where: str) -> Any:
    try:
        value = raw if is_tag and key in TEXT_KEYS + OPTIONAL_TEXT_KEYS else json.loads(raw)
    except json.JSONDecodeError:
        raise ModelLoadError(f"{where} is not valid JSON: {raw!r}") from None
    if key in NUMBER_KEYS:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ModelLoadError(f"{where} must be a number, got {raw!r}")
        return float(value) if math.isfinite(value) else None  # NaN (e.g. an undefined metric) is unknown
    if key in TEXT_KEYS + OPTIONAL_TEXT_KEYS:
        if not isinstance(value, str):
            raise ModelLoadError(f"{where} must be a string, got {raw!r}")
        return value
    if not isinstance(value, list):
        raise ModelLoadError(f"{where} must be a JSON list, got {raw!r}")
    return value


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable for large logits)."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class OnnxModel:
    """An ONNX classifier: float32 [batch, *input_shape] raw inputs in, logits out; its card (metadata) and, when
    it has one, its markdown model card."""

    def __init__(self, session: ort.InferenceSession, card: ModelCard, input_name: str, output_name: str,
                 card_markdown: str | None = None) -> None:
        self.session, self.card, self.card_markdown = session, card, card_markdown
        self.input_name, self.output_name = input_name, output_name

    @classmethod
    def load(cls, source: ModelSource, device: str = "auto", threads: int = 0) -> "OnnxModel":
        """Open ``source`` on explicit providers, check it against the serving contract, and warm it up."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        providers = providers_for(device)
        try:
            session = ort.InferenceSession(str(source.path), sess_options=options, providers=providers)
        except Exception as error:  # onnxruntime's exception types share no base class below Exception
            raise ModelLoadError(f"model file '{source.path}' (from {source.uri}) is not a loadable ONNX model: "
                                 f"{error}") from None
        input_name, input_shape = _input_contract(session)
        names = [o.name for o in session.get_outputs()]
        output_name = "logits" if "logits" in names else names[0]
        meta = recorded_metadata(session.get_modelmeta().custom_metadata_map, source.tags)
        if "input_shape" in meta and tuple(meta["input_shape"]) != input_shape:
            raise ModelLoadError(f"recorded input_shape {meta['input_shape']} differs from the ONNX graph's "
                                 f"{list(input_shape)}")
        num_classes = _warm_up(session, input_name, output_name, input_shape)
        class_names = tuple(str(c) for c in meta.get("class_names", range(num_classes)))
        if len(class_names) != num_classes:
            raise ModelLoadError(f"recorded class_names has {len(class_names)} entries but the model outputs "
                                 f"{num_classes} logits")
        card = ModelCard(name=source.name, version=source.version, alias=source.alias, uri=source.uri,
                         input_shape=input_shape, class_names=class_names, providers=tuple(session.get_providers()),
                         file_bytes=model_bytes(source.path),
                         **{k: meta.get(k) for k in NUMBER_KEYS + TEXT_KEYS + OPTIONAL_TEXT_KEYS})
        return cls(session, card, input_name, output_name, source.card_markdown)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw outputs for a float32 batch of shape [n, *input_shape]."""
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def classify(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits and class probabilities [n, classes]; InputError when an item drives the logits to inf or NaN."""
        logits = self.logits(batch)
        broken = ~np.isfinite(logits).all(axis=1)
        if broken.any():
            raise InputError(f"item {int(np.argmax(broken))} drives the model's outputs to infinity or NaN: "
                             "its values are far outside the range the model was trained on")
        return logits, softmax(logits)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities [n, classes] (see ``classify``)."""
        return self.classify(batch)[1]

    def check_ready(self) -> None:
        """Run a zero batch of one; ModelLoadError when the session fails."""
        try:
            self.logits(np.zeros((1, *self.card.input_shape), dtype=np.float32))
        except Exception as error:  # onnxruntime's exception types share no base class below Exception
            raise ModelLoadError(f"model not ready: {error}") from None


def _input_contract(session: ort.InferenceSession) -> tuple[str, tuple[int, ...]]:
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)":
        found = [(i.name, i.type) for i in inputs]
        raise ModelLoadError(f"the model must take exactly one float32 tensor; it takes {found}")
    dims = inputs[0].shape
    if len(dims) < 2 or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        raise ModelLoadError(f"the model input must be [batch, fixed sizes...]; it is {dims}")
    if isinstance(dims[0], int):
        raise ModelLoadError(f"the model input has a fixed batch size {dims[0]}; export it with a dynamic batch axis")
    return inputs[0].name, tuple(int(d) for d in dims[1:])


def _warm_up(session: ort.InferenceSession, input_name: str, output_name: str, shape: tuple[int, ...]) -> int:
    """Run a zero batch of two; return the number of classes."""
    try:
        logits = session.run([output_name], {input_name: np.zeros((2, *shape), dtype=np.float32)})[0]
    except Exception as error:  # see OnnxModel.load
        raise ModelLoadError(f"the model fails on a zero batch of shape {[2, *shape]}: {error}") from None
    if logits.ndim != 2 or logits.shape[0] != 2:
        raise ModelLoadError(f"the model must output logits of shape [batch, classes]; got {list(logits.shape)}")
    return int(logits.shape[1])
