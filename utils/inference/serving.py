"""What a serving replica does with a batch of requests: decode, run the config's test pipeline,
forward passes, and each image's answer. No Ray here: the deployment (`on_ray/serve.py`) calls
`ServingModel.detect` with the images `@serve.batch` gathered.

An image's answer does not depend on the other images of its batch. By default each image has
a forward pass of its own: a pass of 2 images rounds differently from one of 1 on some CPUs
(kernels chosen by batch size), and at low score thresholds the ranking and NMS of near-equal
proposals turn that into different detections. With `shape_batches`, images are grouped by the
shape mmdet pads them to when alone (padding to a larger image moves detections), one pass per
group: the same as alone up to that rounding, and faster where batching pays (a GPU).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import cv2
import mmcv
import numpy as np
import torch
from mmcv.transforms import Compose
from mmdet.registry import TRANSFORMS
from mmdet.utils import get_test_pipeline_cfg
from mmengine.dataset import pseudo_collate

from utils.evaluation.drawings import draw_sample
from utils.evaluation.mask_rle import encode_masks
from utils.inference.predict import load_detector
from utils.inference.serving_api import SEND, ApiError, Options, Outcome, Request

logger = logging.getLogger(__name__)


class ServingModel:
    """A loaded export with its test pipeline, answering batches of requests."""

    def __init__(self, export_dir: str | Path, device: str, shape_batches: bool = False) -> None:
        self.export_dir = Path(export_dir)
        self.shape_batches = shape_batches
        self.detector = load_detector(self.export_dir, device)
        steps = get_test_pipeline_cfg(self.detector.cfg)
        steps = [s for s in steps if "LoadAnnotations" not in str(s["type"])]
        # Decoding is done here from the request's bytes, as the config's loading step decodes
        # a file's bytes (its colour type, decoder backend and dtype).
        self.load = TRANSFORMS.build(steps[0])
        self.pipeline = Compose(steps[1:])
        self.classes = tuple(self.detector.dataset_meta["classes"])
        self.pad_divisor = int(
            getattr(self.detector.model.data_preprocessor, "pad_size_divisor", 1)
        )
        self.with_mask = bool(getattr(self.detector.model, "with_mask", False))

    def describe(self) -> dict[str, Any]:
        """The model's part of GET /v1/model."""
        model = self.detector.cfg.model
        backbone = model.get("backbone") or {}
        return {
            "classes": list(self.classes),
            "palette": [list(c) for c in self.detector.dataset_meta.get("palette") or []],
            "export": str(self.export_dir),
            "model": model.get("type"),
            "backbone": f"{backbone.get('type', '?')}{backbone.get('depth', '')}",
            "batches_trained": self.detector.batches,
            "masks": self.with_mask,
            "device": str(next(self.detector.model.parameters()).device),
            "torch_threads": torch.get_num_threads(),
            "pad_size_divisor": self.pad_divisor,
            "forward_pass": "per padded shape" if self.shape_batches else "per image",
        }

    def decode(self, body: bytes) -> tuple[np.ndarray, dict[str, Any]]:
        """The original image (RGB) and its test-pipeline output."""
        flag = getattr(self.load, "color_type", "color")
        backend = getattr(self.load, "imdecode_backend", "cv2")
        try:
            image = mmcv.imfrombytes(body, flag=flag, backend=backend)
        except Exception as err:  # decoders raise many types; all mean "not an image"
            image, reason = None, f"{type(err).__name__}: {str(err)[:120]}"
        else:
            reason = "the decoder returned nothing"
        if image is None:
            raise ApiError(400, f"The body is not a decodable image ({reason}): {SEND}.")
        if image.ndim == 2:  # a config that loads grayscale; drawings need RGB
            original = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        else:
            original = mmcv.bgr2rgb(image)
        if getattr(self.load, "to_float32", False):
            image = image.astype(np.float32)
        shape = image.shape[:2]
        results = {"img": image, "img_shape": shape, "ori_shape": shape, "img_id": 0}
        try:
            packed = self.pipeline({**results, "img_path": None})
        except Exception as err:  # a transform that cannot take this image (e.g. 1 x 5000 px)
            raise ApiError(
                400,
                f"The {shape[1]}x{shape[0]} image cannot go through the model's test pipeline "
                f"({type(err).__name__}: {str(err)[:160]}): send an image of usual proportions.",
            ) from err
        return original, packed

    def padded_shape(self, packed: dict[str, Any]) -> tuple[int, int]:
        """The shape the preprocessor pads this image to when it is alone in its batch."""
        height, width = packed["inputs"].shape[-2:]
        d = self.pad_divisor
        return math.ceil(height / d) * d, math.ceil(width / d) * d

    def detect(self, requests: list[Request]) -> list[Outcome]:
        """Each request's outcome; one failing request never fails the others."""
        outcomes = [Outcome(batch_requests=len(requests)) for _ in requests]
        groups: dict[tuple[int, ...], list[int]] = {}  # one forward pass each
        decoded: dict[int, tuple[np.ndarray, dict[str, Any]]] = {}
        for i, request in enumerate(requests):
            try:
                decoded[i] = self.decode(request.body)
            except ApiError as err:
                outcomes[i].error = err
                continue
            key = self.padded_shape(decoded[i][1]) if self.shape_batches else (i,)
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            for i, sample in self.forward(members, decoded, outcomes):
                original = decoded[i][0]
                try:
                    self.answer(requests[i].options, original, sample, outcomes[i])
                except Exception as err:  # e.g. drawing fails: this request alone
                    logger.exception("Answering request %d of a batch failed", i)
                    outcomes[i].error = ApiError(500, f"Building the answer failed: {err}")
        return outcomes

    def forward(
        self,
        members: list[int],
        decoded: dict[int, tuple[np.ndarray, dict[str, Any]]],
        outcomes: list[Outcome],
    ) -> list[tuple[int, Any]]:
        """(request index, predicted sample) for one group (`forward_each`); an image the model
        fails on gets the error."""
        pairs = []
        for i, sample, size in self.forward_each(members, {i: decoded[i][1] for i in members}):
            if isinstance(sample, Exception):
                logger.error("Predicting an image failed", exc_info=sample)
                outcomes[i].error = ApiError(
                    500, "The model failed on this image; the server's log has the traceback."
                )
            else:
                outcomes[i].forward_batch = size
                pairs.append((i, sample))
        return pairs

    def forward_each(
        self, members: list[int], items: dict[int, dict[str, Any]]
    ) -> list[tuple[int, Any, int]]:
        """(index, sample or the exception, images in its forward pass) for one group: one
        forward pass; if it fails, one pass per image, so that only the image at fault fails."""
        try:
            samples = self.test_step([items[i] for i in members])
        except Exception as err:
            if len(members) == 1:
                return [(members[0], err, 1)]
            logger.exception("A forward pass of %d images failed; one by one now", len(members))
            return [triple for i in members for triple in self.forward_each([i], items)]
        return [(i, sample, len(members)) for i, sample in zip(members, samples, strict=True)]

    def test_step(self, items: list[dict[str, Any]]) -> list[Any]:
        with torch.no_grad():
            return self.detector.model.test_step(pseudo_collate(items))

    def answer(self, options: Options, original: np.ndarray, sample: Any, outcome: Outcome) -> None:
        """The detections scoring above the threshold, best first, as JSON or a PNG drawing."""
        pred = sample.pred_instances
        order = torch.argsort(pred.scores, descending=True, stable=True)
        pred = pred[order[pred.scores[order] > options.score_thr]]
        if options.max_detections is not None:
            pred = pred[: options.max_detections]
        height, width = original.shape[:2]
        if options.draw:
            sample.pred_instances = pred
            outcome.detections = len(pred)
            drawing = draw_sample(
                original, sample, self.detector.dataset_meta, options.score_thr, False
            )
            ok, png = cv2.imencode(".png", mmcv.rgb2bgr(drawing))
            if not ok:
                raise RuntimeError("OpenCV could not encode the drawing as PNG")
            outcome.png = png.tobytes()
            return
        outcome.detections = len(pred)
        labels, scores = pred.labels.tolist(), pred.scores.tolist()
        detections = [
            {"bbox": box, "score": score, "label": label, "class": self.classes[label]}
            for box, score, label in zip(pred.bboxes.tolist(), scores, labels, strict=True)
        ]
        if options.masks and "masks" in pred:
            for detection, rle in zip(
                detections, encode_masks(pred.masks.detach(), pred.bboxes), strict=True
            ):
                detection["mask"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        outcome.answer = {"image": {"width": width, "height": height}, "detections": detections}
