"""The images of a detect request: the raw body or the repeated multipart field `image`, each
image's size checked from its header before anything decodes it."""

from __future__ import annotations

import io
import warnings

import PIL.Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request as HttpRequest

from utils.inference.serving_api import SEND, ApiError, Settings

RAW_TYPES = ("image/jpeg", "image/png", "image/bmp", "image/x-ms-bmp", "image/webp")
RAW_TYPES += ("image/tiff", "application/octet-stream")
MULTIPART = "multipart/form-data"
FIELD = "image"  # the multipart form field that holds an image (repeated for several)
MULTIPART_SLACK = 64 * 1024  # boundaries and part headers, on top of the images' bytes
HOW_TO_SEND = (
    "send the image as the raw body with its type (curl -H 'Content-Type: image/jpeg' "
    f"--data-binary @photo.jpg) or as the multipart form field `{FIELD}` "
    f"(curl -F {FIELD}=@photo.jpg)"
)


def checked_size(body: bytes, max_pixels: int) -> bytes | ApiError:
    """The body, or the error its header earns: 400 when it is not an image, 413 when it has
    more than `max_pixels` pixels (read from the header, without decoding)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(io.BytesIO(body)) as image:
                width, height = image.size
    except PIL.Image.DecompressionBombError as err:
        return ApiError(
            413, f"The image is too large to decode safely ({err}): send a smaller one."
        )
    except PIL.UnidentifiedImageError:
        return ApiError(400, f"The body is not a decodable image (no image format found): {SEND}.")
    except Exception as err:  # PIL raises several types for a damaged header
        reason = f"{type(err).__name__}: {str(err)[:120]}"
        return ApiError(400, f"The body is not a decodable image ({reason}): {SEND}.")
    if width * height > max_pixels:
        return ApiError(
            413,
            f"The image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels}: send a smaller image (the server's --max-image-pixels).",
        )
    return body


async def read_images(
    request: HttpRequest, settings: Settings
) -> tuple[list[bytes | ApiError], bool]:
    """The images of the raw body or of the multipart fields (each an image or its own error),
    and whether there are several; 415 for another content type, 413 past the size limits
    (reading no further), 400 for a body without an image."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media not in RAW_TYPES and media != MULTIPART:
        shown = media or "missing"
        raise ApiError(415, f"Content-Type {shown} is not supported: {HOW_TO_SEND}.")
    most = settings.max_image_bytes
    limit = settings.max_images * most + MULTIPART_SLACK if media == MULTIPART else most
    too_large = ApiError(
        413, f"The image is over the limit of {most} bytes: send a smaller file (the server's "
        "--max-image-bytes).",
    )  # fmt: skip
    if media == MULTIPART:
        too_large = ApiError(
            413, f"The body is over the limit of {limit} bytes ({settings.max_images} images of "
            f"{most} bytes): send fewer or smaller images (the server's --max-images, "
            "--max-image-bytes).",
        )  # fmt: skip
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    if media != MULTIPART:
        if not body:
            raise ApiError(400, f"The image is empty: {HOW_TO_SEND}.")
        return [bytes(body)], False
    images = await multipart_images(request, bytes(body), settings.max_images)
    checked: list[bytes | ApiError] = []
    for image in images:
        if len(image) > most:
            image = ApiError(413, f"The image is over the limit of {most} bytes: send a smaller "
                             "file (the server's --max-image-bytes).")  # fmt: skip
        elif not image:
            image = ApiError(400, f"The image is empty: {HOW_TO_SEND}.")
        checked.append(image)
    return checked, len(checked) > 1


async def multipart_images(request: HttpRequest, body: bytes, max_images: int) -> list[bytes]:
    """The `image` fields of a multipart/form-data body, in order."""

    async def stream():  # the body already read (and limited) above
        yield body

    parser = MultiPartParser(
        request.headers, stream(), max_files=max_images + 8, max_fields=64, max_part_size=65536
    )
    try:
        form = await parser.parse()
    except MultiPartException as err:
        reason = f"The multipart body cannot be read ({err.message}): {HOW_TO_SEND}."
        raise ApiError(400, reason) from err
    try:
        fields = form.getlist(FIELD)
        if not fields:
            names = ", ".join(dict.fromkeys(form.keys())) or "none"
            raise ApiError(
                400, f"The multipart form has no field `{FIELD}` (fields: {names}): {HOW_TO_SEND}."
            )
        if len(fields) > max_images:
            raise ApiError(
                413, f"The request has {len(fields)} images, over the limit of {max_images}: "
                "send them in several requests (the server's --max-images).",
            )  # fmt: skip
        images = []
        for field in fields:
            if not isinstance(field, UploadFile):  # a text field: curl -F image=<file
                raise ApiError(
                    400, f"The field `{FIELD}` holds text, not a file: send it as a file "
                    f"(curl -F {FIELD}=@photo.jpg).",
                )  # fmt: skip
            images.append(await field.read())
        return images
    finally:
        await form.close()
