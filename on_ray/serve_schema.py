"""The serving API's answers as OpenAPI schemas (what `/docs` and `/openapi.json` show).

Documentation only: the routes build their JSON themselves, so no answer is validated twice.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Mask(BaseModel):
    """COCO run-length encoding (`pycocotools.mask.decode` reads it)."""

    size: list[int] = Field(description="[height, width] of the image")
    counts: str


class Detection(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    bbox: list[float] = Field(description="x1, y1, x2, y2 in the original image's pixels")
    score: float
    label: int = Field(description="index into GET /v1/model's classes")
    class_name: str = Field(alias="class")
    mask: Mask | None = Field(None, description="for models with masks, unless masks=none")


class ImageSize(BaseModel):
    width: int
    height: int


class Detections(BaseModel):
    """One image's answer: its detections above the threshold, best first."""

    image: ImageSize
    detections: list[Detection]


class ErrorAnswer(BaseModel):
    """A refused request, or one image of several that failed."""

    error: str = Field(description="what is wrong and what to do")
    status: int = Field(description="the HTTP status it has (or would have alone)")


class ManyDetections(BaseModel):
    """A request of several images: one entry per image, in the order sent."""

    results: list[Detections | ErrorAnswer]


def errors(*statuses: int) -> dict[int | str, dict]:
    """FastAPI's `responses` entries for JSON errors of these statuses."""
    return {status: {"model": ErrorAnswer} for status in statuses}


DETECT_RESPONSES: dict[int | str, dict] = {
    200: {
        "description": "One image: its detections (or with draw=1, a PNG). Several images: "
        "`results`, one entry each.",
        "content": {"image/png": {}},
        "model": Detections | ManyDetections,
    },
    **errors(400, 413, 415, 422, 500),
}
DETECT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more images (the field repeated)",
                        }
                    },
                }
            },
            **{
                media: {"schema": {"type": "string", "format": "binary"}}
                for media in ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff")
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
