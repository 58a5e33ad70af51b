"""Load the model, build the app and run uvicorn; the entry point of `python -m serving` and `ballot serve`."""

from __future__ import annotations

import sys
from typing import Any, Mapping

import uvicorn

from serving.app import create_app
from serving.errors import ServingError
from serving.model_source import fetch_model
from serving.protocol import protocol_class
from serving.runtime import OnnxModel
from serving.settings import Settings, load_settings


def load_model(settings: Settings) -> OnnxModel:
    """Resolve ``settings.model_uri`` (file or registry) and open it in ONNX Runtime."""
    with fetch_model(settings.model_uri, settings.tracking_uri, settings.registry_timeout) as source:
        return OnnxModel.load(source, device=settings.device, threads=settings.threads)


def build_server(model: OnnxModel, settings: Settings) -> uvicorn.Server:
    """A uvicorn server for ``model``: one process on uvloop, HTTP parsed by httptools.

    Each request must arrive within ``settings.read_timeout`` seconds (``serving.protocol``); beyond
    ``settings.max_connections`` open connections or requests in flight uvicorn answers 503 (what bodies can hold
    at once: max_connections x max_body_bytes); the refusals of the HTTP layer are counted in the app's metrics; one
    line per request goes to the access log only when ``settings.access_log`` asks for it.
    """
    app = create_app(model, settings)
    http = protocol_class(settings.read_timeout, app.state.metrics.observe_refusal)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, loop="uvloop", http=http,
                            log_level=settings.log_level, access_log=settings.access_log, server_header=False,
                            limit_concurrency=settings.max_connections + 1)  # uvicorn counts the asking one
    return uvicorn.Server(config)


def main(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Start the service; a configuration or model problem prints one clear line and returns 2. A SIGTERM ends the
    process by that signal (status 143) once uvicorn has drained the requests in flight: uvicorn raises it again."""
    try:
        settings = load_settings(environ, overrides)
        model = load_model(settings)
    except ServingError as error:
        print(f"ballot serve: error: {error}", file=sys.stderr)
        return 2
    card = model.card
    print(f"ballot serve: {card.label()}; input {list(card.input_shape)}, {len(card.class_names)} classes, "
          f"providers {list(card.providers)}",
          file=sys.stderr)
    server = build_server(model, settings)
    server.run()
    return 0 if server.started else 1
