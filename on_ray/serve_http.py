"""The serving API over HTTP: routes, the image in a request, query values, JSON errors.

No Ray here: `on_ray/serve.py`'s deployment hands every request to `handle`, with itself as
the `Service` (its settings, its model's description, its batched detection).
"""

from __future__ import annotations

import difflib
import io
import logging
import warnings
from dataclasses import asdict
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any, Protocol

import PIL.Image
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response

from utils.inference.serving_api import SEND, ApiError, Options, Outcome, Request, Settings

logger = logging.getLogger(__name__)
PAGE = Path(__file__).resolve().parent / "static" / "index.html"
RAW_TYPES = ("image/jpeg", "image/png", "image/bmp", "image/x-ms-bmp", "image/webp")
RAW_TYPES += ("image/tiff", "application/octet-stream")
MULTIPART = "multipart/form-data"
FIELD = "image"  # the multipart form field that holds the image
MULTIPART_SLACK = 64 * 1024  # boundaries and part headers, on top of the image's bytes
QUERY_KEYS = ("score_thr", "max_detections", "masks", "draw")
HOW_TO_SEND = (
    "send the image as the raw body with its type (curl -H 'Content-Type: image/jpeg' "
    f"--data-binary @photo.jpg) or as the multipart form field `{FIELD}` "
    f"(curl -F {FIELD}=@photo.jpg)"
)


class Service(Protocol):
    settings: Settings

    def describe(self) -> dict[str, Any]: ...

    async def detect_batch(self, request: Request) -> Outcome: ...


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status, headers=headers)


async def handle(request: HttpRequest, service: Service) -> Response:
    """Answer one HTTP request; any failure becomes a JSON error, never a dead service."""
    routes = {
        "/": ("GET", page),
        "/v1/detect": ("POST", detect),
        "/v1/model": ("GET", model_info),
        "/healthz": ("GET", health),
    }
    path = request.url.path.rstrip("/") or "/"
    if path not in routes:
        return error(404, f"No route {path}: the API has {', '.join(routes)}.")
    method, route = routes[path]
    if request.method != method and not (method == "GET" and request.method == "HEAD"):
        return error(405, f"{path} takes {method}, not {request.method}.", {"Allow": method})
    try:
        return await route(request, service)
    except ApiError as err:
        return error(err.status, err.message)
    except Exception:  # a bug, never the client's input: logged, answered, the replica lives
        logger.exception("Request %s %s failed", request.method, path)
        return error(500, "The server failed on this request; its log has the traceback.")


async def page(request: HttpRequest, service: Service) -> Response:
    return HTMLResponse(PAGE.read_text())


async def health(request: HttpRequest, service: Service) -> Response:
    return JSONResponse({"status": "ok"})


async def model_info(request: HttpRequest, service: Service) -> Response:
    # The model's description last: its `device` is the one the replica uses.
    return JSONResponse({**asdict(service.settings), **service.describe()})


async def detect(request: HttpRequest, service: Service) -> Response:
    settings = service.settings
    options = parse_options(request.query_params.multi_items(), settings.score_thr)
    body = await read_image(request, settings.max_image_bytes)
    image_size(body, settings.max_image_pixels)  # from the header: refused before decoding
    outcome = await service.detect_batch(Request(body, options))
    headers = {
        "X-Batch-Size": str(outcome.forward_batch),  # images in this image's forward pass
        "X-Batch-Requests": str(outcome.batch_requests),  # requests batched with it
    }
    if outcome.error is not None:
        return error(outcome.error.status, outcome.error.message, headers)
    if outcome.png is not None:
        return Response(outcome.png, media_type="image/png", headers=headers)
    return JSONResponse(outcome.answer, headers=headers)


def parse_options(items: list[tuple[str, str]], default_thr: float) -> Options:
    """The detect query's values; 422 naming a key or value it cannot take."""
    query: dict[str, str] = {}
    for key, value in items:
        if key not in QUERY_KEYS:
            close = difflib.get_close_matches(key, QUERY_KEYS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ApiError(422, f"Unknown query key {key!r}: {hint}known: {', '.join(QUERY_KEYS)}.")
        if key in query:
            raise ApiError(422, f"Query key {key} is given twice: give it once.")
        query[key] = value
    score_thr = default_thr
    if "score_thr" in query:
        try:
            score_thr = float(query["score_thr"])
        except ValueError:
            score_thr = -1.0
        if not 0.0 <= score_thr <= 1.0:  # also NaN
            raise ApiError(422, f"score_thr={query['score_thr']}: use a number from 0 to 1.")
    max_detections = None
    if "max_detections" in query:
        text = query["max_detections"]
        if not text.isdigit():
            raise ApiError(422, f"max_detections={text}: use an integer >= 0.")
        max_detections = int(text)
    masks = query.get("masks", "rle")
    if masks not in ("rle", "none"):
        raise ApiError(422, f"masks={masks}: use rle (COCO run-length encoding) or none.")
    draw = query.get("draw", "0")
    if draw not in ("0", "1"):
        raise ApiError(422, f"draw={draw}: use 1 (a PNG drawing) or 0 (JSON).")
    return Options(score_thr, max_detections, masks == "rle", draw == "1")


def image_size(body: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding it: 400 when it is not an
    image, 413 when it has more than `max_pixels` pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(io.BytesIO(body)) as image:
                width, height = image.size
    except PIL.Image.DecompressionBombError as err:
        raise ApiError(
            413, f"The image is too large to decode safely ({err}): send a smaller one."
        ) from err
    except PIL.UnidentifiedImageError as err:
        raise ApiError(
            400, f"The body is not a decodable image (no image format found): {SEND}."
        ) from err
    except Exception as err:  # PIL raises several types for a damaged header
        reason = f"{type(err).__name__}: {str(err)[:120]}"
        raise ApiError(400, f"The body is not a decodable image ({reason}): {SEND}.") from err
    if width * height > max_pixels:
        raise ApiError(
            413,
            f"The image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels}: send a smaller image (the server's --max-image-pixels).",
        )
    return width, height


async def read_image(request: HttpRequest, max_bytes: int) -> bytes:
    """The image's bytes from the raw body or the multipart field; 415 for another content
    type, 413 past `max_bytes` (read no further), 400 for an empty or image-less body."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media not in RAW_TYPES and media != MULTIPART:
        shown = media or "missing"
        raise ApiError(415, f"Content-Type {shown} is not supported: {HOW_TO_SEND}.")
    limit = max_bytes + (MULTIPART_SLACK if media == MULTIPART else 0)
    too_large = ApiError(
        413, f"The image is over the limit of {max_bytes} bytes: send a smaller file (the "
        "server's --max-image-bytes).",
    )  # fmt: skip
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    data = multipart_field(content_type, bytes(body)) if media == MULTIPART else bytes(body)
    if len(data) > max_bytes:
        raise too_large
    if not data:
        raise ApiError(400, f"The image is empty: {HOW_TO_SEND}.")
    return data


def multipart_field(content_type: str, body: bytes) -> bytes:
    """The `image` field of a multipart/form-data body (parsed by the standard library)."""
    header = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    message = BytesParser(policy=policy.HTTP).parsebytes(header + body)
    parts = list(message.iter_parts()) if message.is_multipart() else []
    names = [part.get_param("name", header="content-disposition") for part in parts]
    for name, part in zip(names, parts, strict=True):
        if name == FIELD:
            return part.get_payload(decode=True) or b""
    found = ", ".join(str(n) for n in names) if names else "none"
    raise ApiError(
        400, f"The multipart form has no field `{FIELD}` (fields: {found}): {HOW_TO_SEND}."
    )
