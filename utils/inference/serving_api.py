"""The serving API's types, light to import: the service's settings, a request's options,
its outcome, and the error a refused request gets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# What to do about a body that is not an image.
SEND = "send a JPEG, PNG, BMP, WebP or TIFF file"


@dataclass(frozen=True)
class Settings:
    """The service's settings, the same on every replica."""

    score_thr: float = 0.3
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    device: str | None = None  # None: CUDA when the replica has a GPU, else the CPU


class ApiError(Exception):
    """A request the service refuses: its HTTP status and a message saying what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Options:
    """One request's query: detections scoring above `score_thr`, at most `max_detections`
    (None: all the config's test_cfg keeps), masks as COCO RLE or none, a PNG drawing."""

    score_thr: float
    max_detections: int | None = None
    masks: bool = True
    draw: bool = False


@dataclass
class Request:
    """An image to detect on (its encoded bytes) and what to answer."""

    body: bytes
    options: Options


@dataclass
class Outcome:
    """A request's answer (JSON-ready dict, or PNG bytes when drawn) or its error; with the
    number of images in its forward pass and of requests in its batch."""

    answer: dict[str, Any] | None = None
    png: bytes | None = None
    error: ApiError | None = None
    forward_batch: int = 0
    batch_requests: int = 0
