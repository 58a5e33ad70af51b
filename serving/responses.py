"""JSON bodies for the service: orjson encoding and decoding, error bodies, validation errors as one line."""

from __future__ import annotations

import json
from typing import Any, Callable, Coroutine, Mapping, Sequence

import orjson
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

V2_PREFIX = "/v2"


def loads(body: bytes) -> Any:
    """Decode JSON with orjson; NaN, Infinity and integers beyond 64 bits (which orjson refuses) by the standard library.

    Raises json.JSONDecodeError for anything that is not JSON the service can decode: invalid text, text that is
    not UTF-8, nesting too deep for the standard library or an integer too long to convert.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body.decode("utf-8"))  # decoded here: on bytes json.loads also takes UTF-16 and UTF-32
    except json.JSONDecodeError:
        raise
    except UnicodeDecodeError as error:
        raise json.JSONDecodeError(f"not UTF-8 ({error.reason} at byte {error.start})", "", 0) from None
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", "", 0) from None
    except ValueError as error:
        raise json.JSONDecodeError(str(error).split(";")[0], "", 0) from None


def json_response(content: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """``content`` encoded by orjson (numpy arrays included)."""
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    headers=headers, media_type="application/json")


def is_v2(path: str) -> bool:
    """Whether ``path`` belongs to the Open Inference Protocol (its errors: ``{"error": ...}``, bad input 400)."""
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_response(path: str, status: int, message: str) -> Response:
    """An error in the format of the protocol ``path`` belongs to: ``{"error": ...}`` under /v2, else ``{"detail": ...}``."""
    return json_response({"error" if is_v2(path) else "detail": message}, status)


def input_error_response(path: str, message: str) -> Response:
    """Bad input in the format and status of ``path``'s protocol: 400 under /v2, else 422."""
    return error_response(path, 400 if is_v2(path) else 422, message)


def describe_validation(errors: Sequence[Any]) -> str:
    """One readable line from pydantic / FastAPI validation errors (locations below the body)."""
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


class OrjsonRequest(Request):
    """A request whose JSON body is decoded by ``loads``."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class OrjsonRoute(APIRoute):
    """A FastAPI route that decodes its JSON body with orjson (six times faster than the standard library here)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def decode_fast(request: Request) -> Response:
            return await handler(OrjsonRequest(request.scope, request.receive))

        return decode_fast


class RequestRoute(APIRoute):
    """A FastAPI route whose endpoint takes the Request and returns a Response itself, called directly: FastAPI's
    parameter resolution and response handling are skipped (for the inference path, where they cost about as much
    as decoding the request). The route is documented in the OpenAPI schema as usual."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return self.endpoint
