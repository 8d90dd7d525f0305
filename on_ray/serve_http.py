"""The serving API over HTTP: a FastAPI app (OpenAPI at /openapi.json, a form at /docs), its
routes, the images of a request, and every error as JSON `{"error": ..., "status": N}`.

No Ray here: `on_ray/serve.py` puts the app behind `@serve.ingress` and provides the `service`
dependency, the replica (its settings, its model's description, its batched detection).
"""

import asyncio
import difflib
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from fastapi import Depends, FastAPI, Query
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response

from on_ray.serve_body import checked_size, read_images
from on_ray.serve_schema import DETECT_BODY, DETECT_RESPONSES
from utils.inference.serving_api import ApiError, Options, Outcome, Request, Settings

logger = logging.getLogger(__name__)
PAGE = Path(__file__).resolve().parent / "static" / "index.html"
QUERY_KEYS = ("score_thr", "max_detections", "masks", "draw")
HINTS = {
    "score_thr": "use a number from 0 to 1",
    "max_detections": "use an integer >= 0",
    "masks": "use rle (COCO run-length encoding) or none",
    "draw": "use 1 (a PNG drawing) or 0 (JSON)",
}
ROUTES = ("/", "/v1/detect", "/v1/model", "/healthz", "/docs", "/openapi.json")

app = FastAPI(
    title="Detector",
    summary="An MMDetection model on Ray Serve: POST an image, get its detections.",
    version="1",
    redoc_url=None,
)


class Service(Protocol):
    settings: Settings

    def describe(self) -> dict[str, Any]: ...

    async def detect_batch(self, request: Request) -> Outcome: ...


def service() -> Service:
    """The replica that answers; the deployment overrides this dependency with itself (a
    dependency rather than methods: Ray's class-based routes lose `self` on FastAPI 0.165)."""
    raise RuntimeError("No service: run the app behind on_ray/serve.py's deployment.")


Replica = Annotated[Service, Depends(service)]


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status, headers=headers)


@app.exception_handler(ApiError)
async def api_error(request: HttpRequest, err: ApiError) -> JSONResponse:
    return error(err.status, err.message)


@app.exception_handler(RequestValidationError)
async def invalid_query(request: HttpRequest, err: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 in our shape, naming the key and value and what to use."""
    messages = []
    for item in err.errors():
        key = str(item["loc"][-1])
        if key in HINTS:
            messages.append(f"{key}={request.query_params.get(key)}: {HINTS[key]}.")
        else:
            messages.append(f"{'.'.join(map(str, item['loc']))}: {item['msg']}.")
    return error(422, " ".join(messages))


@app.exception_handler(HTTPException)
async def http_error(request: HttpRequest, err: HTTPException) -> JSONResponse:
    path = request.url.path
    if err.status_code == 404:
        return error(404, f"No route {path}: the API has {', '.join(ROUTES)}.")
    if err.status_code == 405:
        allowed = (err.headers or {}).get("Allow", "")
        return error(405, f"{path} takes {allowed}, not {request.method}.", err.headers)
    return error(err.status_code, str(err.detail), err.headers)


@app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text())


@app.api_route("/healthz", methods=["GET", "HEAD"], summary="Whether the replica answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.api_route("/v1/model", methods=["GET", "HEAD"], summary="The model and the settings")
async def model_info(replica: Replica) -> dict[str, Any]:
    # The model's description last: its `device` is the one the replica uses.
    return {**asdict(replica.settings), **replica.describe()}


@app.post(
    "/v1/detect",
    summary="Detect objects in one image or several",
    response_class=JSONResponse,
    responses=DETECT_RESPONSES,
    openapi_extra=DETECT_BODY,
)
async def detect(
    request: HttpRequest,
    replica: Replica,
    score_thr: Annotated[
        float | None, Query(ge=0, le=1, allow_inf_nan=False, description="default: the server's")
    ] = None,
    max_detections: Annotated[
        int | None, Query(ge=0, description="default: all the config's test_cfg keeps")
    ] = None,
    masks: Annotated[Literal["rle", "none"], Query(description="COCO RLE or none")] = "rle",
    draw: Annotated[Literal["0", "1"], Query(description="1: a PNG drawing")] = "0",
) -> Response:
    """The image as the raw body (`Content-Type: image/...`) or as the multipart field
    `image`, repeated for several images (answered in order, each on its own)."""
    check_query_keys(request.query_params.multi_items())
    if score_thr is None:
        score_thr = replica.settings.score_thr
    options = Options(score_thr, max_detections, masks == "rle", draw == "1")
    try:
        return await answer(request, replica, options)
    except ApiError:
        raise
    except Exception:  # a bug, never the client's input: logged, answered, the replica lives
        logger.exception("Request %s %s failed", request.method, request.url.path)
        return error(500, "The server failed on this request; its log has the traceback.")


async def answer(request: HttpRequest, replica: Service, options: Options) -> Response:
    settings = replica.settings
    images, several = await read_images(request, settings)
    if several and options.draw:
        raise ApiError(422, "draw=1 answers one image with a PNG: send one image, or draw=0.")
    outcomes: list[Outcome | None] = []
    for image in images:  # checked from the header: refused before decoding
        if not isinstance(image, ApiError):
            image = checked_size(image, settings.max_image_pixels)
        outcomes.append(Outcome(error=image) if isinstance(image, ApiError) else None)
    # One call per image: the batch counts images, and a request's are batched together.
    queued = time.perf_counter()
    pending = [
        replica.detect_batch(Request(image, options, queued))
        for image, outcome in zip(images, outcomes, strict=True)
        if outcome is None and isinstance(image, bytes)
    ]
    done = iter(await asyncio.gather(*pending))
    results = [outcome or next(done) for outcome in outcomes]
    headers = {
        # per image: the images of its forward pass, and those of its batch
        "X-Batch-Size": ",".join(str(o.forward_batch) for o in results),
        "X-Batch-Requests": ",".join(str(o.batch_requests) for o in results),
    }
    if several:
        return JSONResponse({"results": [entry(o) for o in results]}, headers=headers)
    (outcome,) = results
    if outcome.error is not None:
        return error(outcome.error.status, outcome.error.message, headers)
    if outcome.png is not None:
        return Response(outcome.png, media_type="image/png", headers=headers)
    return JSONResponse(outcome.answer, headers=headers)


def entry(outcome: Outcome) -> dict[str, Any]:
    if outcome.error is not None:
        return {"error": outcome.error.message, "status": outcome.error.status}
    return outcome.answer or {}


def check_query_keys(items: list[tuple[str, str]]) -> None:
    """422 for a key the API does not take (naming the close match) or one given twice."""
    seen = set()
    for key, _ in items:
        if key not in QUERY_KEYS:
            close = difflib.get_close_matches(key, QUERY_KEYS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ApiError(422, f"Unknown query key {key!r}: {hint}known: {', '.join(QUERY_KEYS)}.")
        if key in seen:
            raise ApiError(422, f"Query key {key} is given twice: give it once.")
        seen.add(key)
