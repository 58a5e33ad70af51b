"""Open Inference Protocol (KServe v2) routes, so that Triton / KServe clients and gateways talk to the service.

Errors are ``{"error": "..."}``: 404 for a model or version not served here, 400 for a bad request (413 for too
many items), 503 when the model does not answer.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as package_version

from fastapi import APIRouter, Request, Response

from serving.errors import ModelLoadError, NotServedError
from serving.metrics import Metrics
from serving.oip import DATATYPES, HEADER_LENGTH, decode_request, encode_response
from serving.responses import RequestRoute, error_response, json_response
from serving.runtime import OnnxModel
from serving.settings import Settings

PLATFORM = "onnxruntime"
INFER_ROUTE = "/v2/models/{name}/infer"
NAME_PARAMETER = {"parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                                  "description": "the served model's name (see /metadata)"}]}


def server_version() -> str:
    try:
        return package_version("ballot")
    except PackageNotFoundError:  # the serving image holds serving/ without the package metadata
        return "unpackaged"


def v2_router(model: OnnxModel, settings: Settings, metrics: Metrics) -> APIRouter:
    """The protocol's health, metadata and infer routes for ``model``."""
    card = model.card
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])
    served_versions = [card.version] if card.version else []
    input_shape = [-1, *card.input_shape]

    def check_served(name: str, version: str | None) -> None:
        if name != card.name:
            raise NotServedError(f"model '{name}' is not served here; this service serves '{card.name}'")
        if version is not None and version not in served_versions:
            raise NotServedError(f"model '{name}' has no version '{version}' here; served versions: "
                                 f"{served_versions or 'none (a plain file)'}")

    def readiness(path: str) -> Response:
        try:
            model.check_ready()
        except ModelLoadError as error:
            return error_response(path, 503, str(error))
        return Response(status_code=200)

    async def infer(request: Request) -> Response:
        check_served(request.path_params["name"], request.path_params.get("version"))
        content, headers = answer(await request.body(), request.headers.get(HEADER_LENGTH))
        return Response(content, headers=headers)

    def answer(body: bytes, header_length: str | None) -> tuple[bytes, dict[str, str]]:
        """Decode, run and encode on the event loop: the model's intra-op threads use the cores, and handing a
        batch to a worker thread costs as much as running it (docs/serving.md, "Speed")."""
        decoded = decode_request(body, header_length, model.input_name, card.input_shape, settings.max_batch)
        logits, probabilities = model.classify(decoded.batch)
        classes = probabilities.argmax(axis=1)
        metrics.observe_predictions(INFER_ROUTE, classes)
        tensors = {"logits": logits, "probabilities": probabilities, "class_index": classes}
        wanted = {name: tensors[name] for name in decoded.outputs}
        return encode_response(card.name, card.version or "", decoded.id, wanted, decoded.outputs)

    # The hot path first, as routes are matched in order; RequestRoute calls it without FastAPI's parameter
    # resolution, so the path parameters are read from the request (and documented by NAME_PARAMETER).
    router.add_api_route("/models/{name}/infer", infer, methods=["POST"], route_class_override=RequestRoute,
                         summary="Inference, JSON tensors or the binary-tensor extension", openapi_extra=NAME_PARAMETER)
    router.add_api_route("/models/{name}/versions/{version}/infer", infer, methods=["POST"],
                         route_class_override=RequestRoute, include_in_schema=False)

    @router.get("", summary="Server metadata")
    def server_metadata() -> Response:
        return json_response({"name": "ballot", "version": server_version(), "extensions": ["binary_tensor_data"]})

    @router.get("/health/live", summary="Liveness: 200 while the process answers")
    def live() -> Response:
        return Response(status_code=200)

    @router.get("/health/ready", summary="Readiness: 200 when the model answers a probe batch, else 503")
    def ready(request: Request) -> Response:
        return readiness(request.url.path)

    @router.get("/models/{name}", summary="Model metadata (also under /versions/{version})")
    @router.get("/models/{name}/versions/{version}", include_in_schema=False)
    def model_metadata(name: str, version: str | None = None) -> Response:
        check_served(name, version)
        outputs = [{"name": output, "datatype": datatype,
                    "shape": [-1] if output == "class_index" else [-1, len(card.class_names)]}
                   for output, datatype in DATATYPES.items()]
        return json_response({"name": card.name, "versions": served_versions, "platform": PLATFORM,
                              "inputs": [{"name": model.input_name, "datatype": "FP32", "shape": input_shape}],
                              "outputs": outputs})

    @router.get("/models/{name}/ready", summary="Model readiness (also under /versions/{version})")
    @router.get("/models/{name}/versions/{version}/ready", include_in_schema=False)
    def model_ready(request: Request, name: str, version: str | None = None) -> Response:
        check_served(name, version)
        return readiness(request.url.path)

    return router
