"""The FastAPI application: /health, /ready, /metadata and /predict around one loaded model."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import BatchSizeError, InputError
from serving.inputs import check_batch_size, from_nested, from_pngs
from serving.runtime import OnnxModel
from serving.schemas import (ErrorBody, Health, MetadataResponse, Prediction, PredictRequest, PredictResponse,
                             Readiness)
from serving.settings import Settings

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {413: {"model": ErrorBody}, 422: {"model": ErrorBody}}


class BodyLimit:
    """ASGI middleware: answer 413 to a request body above ``max_bytes`` before the app reads it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request body exceeds the limit of {self.max_bytes} bytes; send fewer items per request"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


def describe_validation(errors: Sequence[Any]) -> str:
    """One readable line from pydantic / FastAPI validation errors."""
    messages: list[str] = []
    for error in errors:
        if error["type"] == "json_invalid":
            return f"request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"][1:]).lstrip(".")
        message = str(error["msg"]).removeprefix("Value error, ")
        if not where and error["type"] in ("missing", "model_attributes_type", "dict_type"):
            message = "the request body must be a JSON object with 'inputs' or 'images' (Content-Type: application/json)"
        messages.append(f"{where}: {message}" if where else message)
    unique = list(dict.fromkeys(messages))
    more = f" (and {len(unique) - 5} more)" if len(unique) > 5 else ""
    return "; ".join(unique[:5]) + more


async def _validation_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    return JSONResponse({"detail": describe_validation(error.errors())}, status_code=422)


async def _input_error(_: Request, error: Exception) -> JSONResponse:
    status = 413 if isinstance(error, BatchSizeError) else 422
    return JSONResponse({"detail": str(error)}, status_code=status)


def create_app(model: OnnxModel, settings: Settings) -> FastAPI:
    """The service for ``model``; limits come from ``settings``."""
    card = model.card
    app = FastAPI(title="ballot model service", description=f"ONNX Runtime predictions of {card.label()}.")
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(InputError, _input_error)
    probe = np.zeros((1, *card.input_shape), dtype=np.float32)

    @app.get("/health", response_model=Health, summary="Liveness: the process answers")
    def health() -> Health:
        return Health(status="ok")

    @app.get("/ready", response_model=Readiness, responses={503: {"model": ErrorBody}},
             summary="Readiness: the model is loaded and answers a probe batch")
    def ready() -> Readiness:
        try:
            model.logits(probe)
        except Exception as error:  # onnxruntime's exception types share no base class below Exception
            raise HTTPException(503, f"model not ready: {error}") from None
        return Readiness(ready=True, model=card.name, version=card.version)

    @app.get("/metadata", response_model=MetadataResponse, summary="The model card")
    def metadata() -> MetadataResponse:
        return MetadataResponse(**card.model_dump(), max_batch=settings.max_batch)

    @app.post("/predict", response_model=PredictResponse, responses=ERROR_RESPONSES,
              summary="Class, class name and probabilities for each item of a batch")
    def predict(request: PredictRequest) -> PredictResponse:
        items = request.inputs if request.inputs is not None else request.images
        check_batch_size(len(items or []), settings.max_batch)
        if request.inputs is not None:
            batch = from_nested(request.inputs, card.input_shape)
        else:
            batch = from_pngs(request.images or [], card.input_shape)
        probabilities = model.predict(batch)
        predictions = [Prediction(class_index=int(row.argmax()), class_name=card.class_names[int(row.argmax())],
                                  probabilities=row.tolist()) for row in probabilities]
        return PredictResponse(model=card.name, version=card.version, predictions=predictions)

    return app
