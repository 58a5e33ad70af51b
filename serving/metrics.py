"""Prometheus metrics of the service: requests by route and status, latencies, batch sizes, the refusals of the HTTP
layer, the model served and the classes it predicted (a drift of the served class mix shows there first)."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.protocol import REFUSALS
from serving.schemas import ModelCard

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CLIENT_CLOSED = "499"  # nginx's status for a request the client abandoned before the answer
UNMATCHED = "unmatched"  # the route label of a path no route serves: raw paths would make labels unbounded


class Metrics:
    """The service's metrics in a registry of their own (one per app, so several apps can share a process)."""

    def __init__(self, card: ModelCard, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter("ballot_http_requests", "HTTP requests answered, by route template, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("ballot_http_request_duration_seconds", "Time from request to the end of the answer",
                                 ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("ballot_batch_size", "Items per prediction request, by route", ["route"],
                                    buckets=_powers_of_two(max_batch), registry=self.registry)
        self.predicted = Counter("ballot_predicted_class", "Items predicted as each class",
                                 ["class_index", "class_name"], registry=self.registry)
        self.class_counters = [self.predicted.labels(str(index), name) for index, name in enumerate(card.class_names)]
        self._children: dict[tuple[str, ...], tuple[Counter, Histogram]] = {}  # labels() takes a lock each call
        refused = Counter("ballot_http_refused", "Requests or connections the HTTP layer refused before the "
                          "application saw them, by reason", ["reason"], registry=self.registry)
        self.refusals = {reason: refused.labels(reason) for reason in REFUSALS}  # every reason from 0 at start-up
        Info("ballot_model", "The model served", registry=self.registry).info(
            {"name": card.name, "version": card.version or "", "alias": card.alias or "", "uri": card.uri,
             "method": card.method or "", "dataset": card.dataset or "", "providers": ",".join(card.providers)})

    def observe_request(self, route: str, method: str, status: str, seconds: float) -> None:
        """Count one HTTP request and its duration."""
        labels = (route, method, status)
        children = self._children.get(labels)
        if children is None:
            children = self._children[labels] = (self.requests.labels(*labels), self.latency.labels(*labels))
        children[0].inc()
        children[1].observe(seconds)

    def observe_refusal(self, reason: str) -> None:
        """Count one refusal of the HTTP layer (a key of ``serving.protocol.REFUSALS``)."""
        self.refusals[reason].inc()

    def observe_predictions(self, route: str, classes: np.ndarray) -> None:
        """Count one prediction request of ``len(classes)`` items and the class of each."""
        self.batch_size.labels(route).observe(len(classes))
        counts = np.bincount(classes, minlength=len(self.class_counters))
        for index in np.flatnonzero(counts).tolist():
            self.class_counters[index].inc(int(counts[index]))

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)


def _powers_of_two(limit: int) -> tuple[float, ...]:
    bounds = [1]
    while bounds[-1] < limit:
        bounds.append(bounds[-1] * 2)
    return tuple(float(b) for b in bounds)


class RequestMetrics:
    """ASGI middleware counting and timing every HTTP request by its route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, route_lists: Sequence[Sequence[BaseRoute]]) -> None:
        """``route_lists``: the app's routes and those of every router it includes (live lists: routes added later
        count); an included router's own entry in the app's list has no path and is passed over."""
        self.app, self.metrics, self.route_lists = app, metrics, route_lists

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), None

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        except Exception:
            status = status or 500  # the server error middleware outside answers 500
            raise
        finally:  # no response started and nothing raised: the client went away before one could be sent
            label = CLIENT_CLOSED if status is None else str(status)
            self.metrics.observe_request(self._route(scope), scope["method"], label, time.perf_counter() - start)

    def _route(self, scope: Scope) -> str:
        """The template of the route that served ``scope`` (also when a middleware answered before routing)."""
        route = scope.get("route")
        if route is None:
            route = next((r for routes in self.route_lists for r in routes
                          if hasattr(r, "path") and r.matches(scope)[0] != Match.NONE), None)
        return getattr(route, "path", UNMATCHED)
