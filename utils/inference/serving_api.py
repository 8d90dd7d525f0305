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
    batch_wait_ms: float = 0.0  # images that arrive while a batch runs form the next one
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_images: int = 16  # per request (the repeated multipart field `image`)
    device: str | None = None  # None: CUDA when the replica has a GPU, else the CPU
    # False: one forward pass per image, so an answer is bit for bit the image's answer alone
    # (a batched pass rounds differently on some CPUs and GPUs, and at low thresholds that
    # changes which near-equal proposals survive). True: one pass per padded shape, faster
    # on a GPU, answers equal to an image's alone only up to that rounding.
    shape_batches: bool = False


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
    queued: float = 0.0  # time.perf_counter() when it was handed to the batch


@dataclass
class Outcome:
    """A request's answer (JSON-ready dict, or PNG bytes when drawn) or its error; with the
    number of images in its forward pass and in its batch, and of its detections."""

    answer: dict[str, Any] | None = None
    png: bytes | None = None
    error: ApiError | None = None
    forward_batch: int = 0
    batch_requests: int = 0
    detections: int = 0
