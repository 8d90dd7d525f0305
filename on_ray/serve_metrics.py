"""A replica's metrics, through Ray's (`ray.serve.metrics`): Ray exports them with Serve's own
(`ray_serve_*`) in Prometheus text on each node's metrics export port, as `ray_detector_*`,
tagged with the deployment, the replica and the application."""

from __future__ import annotations

import time
from collections import Counter as Tally
from typing import Any

from ray import serve
from ray.serve import metrics

from on_ray.serve_http import ROUTES
from utils.inference.serving_api import Outcome, Request

SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
DETECTIONS = [1, 2, 5, 10, 20, 50, 100, 200, 500]


class ReplicaMetrics:
    """Requests by route and status, their latency, images per batch and per forward pass,
    the wait before a batch runs, and detections per image."""

    def __init__(self, max_batch_size: int) -> None:
        sizes = [float(n) for n in range(1, max_batch_size + 1)]
        self.requests = metrics.Counter(
            "detector_requests", "HTTP requests answered", tag_keys=("route", "status")
        )
        self.latency = metrics.Histogram(
            "detector_request_seconds", "HTTP request latency", SECONDS, tag_keys=("route",)
        )
        self.batch_images = metrics.Histogram(
            "detector_batch_images", "images gathered in a batch (@serve.batch)", sizes
        )
        self.forward_images = metrics.Histogram(
            "detector_forward_pass_images", "images in a forward pass", sizes
        )
        self.queue_wait = metrics.Histogram(
            "detector_queue_wait_seconds", "from a request's image to its batch starting", SECONDS
        )
        self.detections = metrics.Histogram(
            "detector_detections_per_image", "detections answered for an image", DETECTIONS
        )

    def request(self, route: str, status: int, seconds: float) -> None:
        tags = {"route": route if route in ROUTES else "other", "status": str(status)}
        self.requests.inc(tags=tags)
        self.latency.observe(seconds, tags={"route": tags["route"]})

    def batch_started(self, requests: list[Request]) -> None:
        now = time.perf_counter()
        self.batch_images.observe(len(requests))
        for request in requests:
            self.queue_wait.observe(max(0.0, now - request.queued))

    def batch_done(self, outcomes: list[Outcome]) -> None:
        # A pass of k images gave k outcomes with forward_batch == k.
        for size, images in Tally(o.forward_batch for o in outcomes if o.forward_batch).items():
            for _ in range(images // size):
                self.forward_images.observe(size)
        for outcome in outcomes:
            if outcome.error is None:
                self.detections.observe(outcome.detections)


class RequestMetrics:
    """ASGI middleware: each HTTP request's route, status and latency, into the replica's
    `metrics` (validation errors and 404s included, which no route sees)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_noting_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            replica = serve.get_replica_context().servable_object
            replica.metrics.request(scope["path"], status, time.perf_counter() - start)
