"""The FastAPI application around one loaded model: health, metadata, the model card, predictions (JSON, PNG, raw
float32), the Open Inference Protocol (``serving.v2``) and Prometheus metrics."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from serving.errors import BatchSizeError, InputError, ModelLoadError, NotServedError
from serving.inputs import check_batch_size, check_shape, from_float32_bytes, from_nested, from_pngs, parse_shape
from serving.limits import BodyLimit
from serving.metrics import CONTENT_TYPE, Metrics, RequestMetrics
from serving.model_source import CARD_FILE, CARD_FOLDER
from serving.responses import OrjsonRoute, describe_validation, error_response, input_error_response, json_response
from serving.runtime import OnnxModel
from serving.schemas import ErrorBody, Health, MetadataResponse, PredictRequest, PredictResponse, Readiness
from serving.settings import Settings
from serving.v2 import v2_router

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {413: {"model": ErrorBody}, 422: {"model": ErrorBody}}
RAW_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary",
               "description": "the batch as little-endian float32 values in row-major order"}}}}}
MARKDOWN = "text/markdown; charset=utf-8"
RAW_PATH = "/predict/raw"  # raw float32 bodies: no JSON in them to bound
JSON_VALUE_SLACK = 4096  # JSON values beyond the batch's numbers: keys, nesting, small tabular models


async def _validation_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    return input_error_response(request.url.path, describe_validation(error.errors()))


async def _input_error(request: Request, error: Exception) -> Response:
    if isinstance(error, BatchSizeError):
        return error_response(request.url.path, 413, str(error))
    return input_error_response(request.url.path, str(error))


async def _not_served(request: Request, error: Exception) -> Response:
    return error_response(request.url.path, 404, str(error))


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    response = error_response(request.url.path, error.status_code, str(error.detail))
    response.headers.update(error.headers or {})
    return response


def max_json_values(settings: Settings, input_shape: tuple[int, ...]) -> int:
    """Most JSON values a request may hold: twice the numbers of a full batch, plus slack."""
    return 2 * settings.max_batch * math.prod(input_shape) + JSON_VALUE_SLACK


def create_app(model: OnnxModel, settings: Settings) -> FastAPI:
    """The service for ``model``; limits come from ``settings``."""
    card = model.card
    metrics = Metrics(card, settings.max_batch)
    app = FastAPI(title="ballot model service", description=f"ONNX Runtime predictions of {card.label()}.")
    app.state.metrics = metrics  # the server's HTTP layer counts its refusals there
    app.router.route_class = OrjsonRoute
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes,
                       max_values=max_json_values(settings, card.input_shape), raw_paths=frozenset({RAW_PATH}))
    v2 = v2_router(model, settings, metrics)
    app.add_middleware(RequestMetrics, metrics=metrics, route_lists=(v2.routes, app.routes))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(InputError, _input_error)
    app.add_exception_handler(NotServedError, _not_served)
    app.add_exception_handler(HTTPException, _http_error)

    def answer(route: str, batch: np.ndarray) -> Response:
        probabilities = model.predict(batch)
        classes = probabilities.argmax(axis=1)
        metrics.observe_predictions(route, classes)
        names = card.class_names
        return json_response({"model": card.name, "version": card.version, "predictions": [
            {"class_index": index, "class_name": names[index], "probabilities": row}
            for index, row in zip(classes.tolist(), probabilities)]})

    app.include_router(v2)  # first: its inference route is the busiest

    @app.get("/health", response_model=Health, summary="Liveness: the process answers")
    @app.head("/health", response_model=Health, include_in_schema=False)
    def health() -> Health:
        return Health(status="ok")

    @app.get("/ready", response_model=Readiness, responses={503: {"model": ErrorBody}},
             summary="Readiness: the model is loaded and answers a probe batch")
    def ready(request: Request) -> Readiness | Response:
        try:
            model.check_ready()
        except ModelLoadError as error:
            return error_response(request.url.path, 503, str(error))
        return Readiness(ready=True, model=card.name, version=card.version)

    @app.get("/metadata", response_model=MetadataResponse, summary="The model card")
    def metadata() -> MetadataResponse:
        return MetadataResponse(**card.model_dump(), max_batch=settings.max_batch)

    @app.get("/model-card", summary="The model card (markdown) the registration logged, or the file's model_card.md",
             response_class=Response, responses={200: {"content": {MARKDOWN: {}}}, 404: {"model": ErrorBody}})
    def model_card(request: Request) -> Response:
        if model.card_markdown is None:
            return error_response(request.url.path, 404, f"{card.label()} has no model card (a registered version "
                                  f"has it as the {CARD_FOLDER}/{CARD_FILE} artifact of its run, a plain file as "
                                  f"{CARD_FILE} next to it)")
        return Response(model.card_markdown, media_type=MARKDOWN)

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)",
             response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
    def scrape() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.post("/predict", response_model=PredictResponse, responses=ERROR_RESPONSES,
              summary="Class, class name and probabilities for each item of a batch")
    def predict(request: PredictRequest) -> Response:
        items = request.inputs if request.inputs is not None else request.images
        check_batch_size(len(items or []), settings.max_batch)
        if request.inputs is not None:
            batch = from_nested(request.inputs, card.input_shape)
        else:
            batch = from_pngs(request.images or [], card.input_shape)
        return answer("/predict", batch)

    @app.post(RAW_PATH, response_model=PredictResponse, responses=ERROR_RESPONSES, openapi_extra=RAW_BODY,
              summary="Predictions for a batch sent as raw float32 bytes (Content-Type: application/octet-stream)")
    async def predict_raw(request: Request, shape: str = Header(
            alias="X-Tensor-Shape", description="the batch's shape, comma-separated: n followed by input_shape",
            examples=["64,1,28,28"])) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/octet-stream":
            raise InputError("send the batch as raw float32 bytes with Content-Type: application/octet-stream")
        dims = check_shape(parse_shape(shape), card.input_shape, settings.max_batch)
        return answer(RAW_PATH, from_float32_bytes(await request.body(), dims))  # on the loop, as in serving.v2

    return app
