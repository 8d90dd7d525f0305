"""Box-region mask encoding against pycocotools' and mmdet's encoding of the whole masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mmdet.structures.mask import encode_mask_results
from pycocotools import mask as mask_utils

from utils.evaluation.mask_rle import encode_in_boxes, encode_masks, encode_whole


def reference(masks: np.ndarray) -> list[dict]:
    """pycocotools' encoding of each whole mask."""
    return [mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))) for mask in masks]


def blobs(
    rng: np.random.Generator, n: int, h: int, w: int, margin: float = 3.0, spill: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`n` masks, each filled (solid or ragged) inside its box and `spill` pixels around it;
    boxes fractional, up to `margin` pixels beyond the image."""
    masks = np.zeros((n, h, w), bool)
    boxes = np.zeros((n, 4))
    for mask, box in zip(masks, boxes, strict=True):
        box[0::2] = np.sort(rng.uniform(-margin, w + margin, 2))
        box[1::2] = np.sort(rng.uniform(-margin, h + margin, 2))
        x0, x1 = np.clip([np.floor(box[0]) - spill, np.ceil(box[2]) + spill], 0, w).astype(int)
        y0, y1 = np.clip([np.floor(box[1]) - spill, np.ceil(box[3]) + spill], 0, h).astype(int)
        mask[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < rng.choice([0.3, 0.9, 1.0])
    return masks, boxes


def check(masks: np.ndarray, boxes: np.ndarray) -> None:
    expected = reference(masks)
    assert encode_in_boxes(masks, boxes) == expected
    assert encode_masks(torch.from_numpy(masks), torch.from_numpy(boxes)) == expected
    assert encode_masks(masks, boxes.astype(np.float32)) == expected


def test_random_masks_in_boxes_equal_pycocotools() -> None:
    rng = np.random.default_rng(0)
    for case in range(300):
        h, w = rng.integers(1, 40, 2)
        # A pasted mask may spill a pixel over its box: the region's margin takes it in.
        check(*blobs(rng, int(rng.integers(1, 6)), h, w, spill=case % 2))
    masks, boxes = blobs(rng, 8, 48, 64)
    assert encode_masks(masks, boxes) == encode_mask_results(masks)  # mmdet's, as validation


def test_masks_touching_every_border() -> None:
    h, w = 9, 7
    full = np.ones((1, h, w), bool)
    whole_box = np.array([[0.0, 0.0, w, h]])
    check(full, whole_box)
    edges = np.zeros((4, h, w), bool)
    edges[0, 0], edges[1, -1], edges[2, :, 0], edges[3, :, -1] = True, True, True, True
    check(edges, np.repeat(whole_box, 4, axis=0))
    # Full columns: a run crosses from a column's last row into the next column's first.
    columns = np.zeros((2, h, w), bool)
    columns[0, :, 2:5] = True
    columns[1, 3:, 1] = columns[1, :4, 2] = True
    check(columns, np.array([[2.0, 0.0, 5.0, h], [1.0, 0.0, 3.0, h]]))
    corners = np.zeros((2, h, w), bool)
    corners[0, 0, 0] = corners[1, -1, -1] = True
    check(corners, np.array([[0.0, 0.0, 1.0, 1.0], [w - 1.0, h - 1.0, w, h]]))


def test_fractional_and_outside_boxes() -> None:
    rng = np.random.default_rng(1)
    masks, boxes = blobs(rng, 6, 20, 30, margin=50.0)
    boxes[0] = [-1e9, -np.inf, 1e9, np.inf]
    boxes[1] = [40.0, 30.0, 60.0, 45.0]  # wholly outside the image: its mask is empty
    masks[1] = False
    boxes[2] = [12.7, 3.2, 12.9, 3.4]  # under a pixel
    masks[2] = False
    masks[2, 3, 12] = True
    boxes[3] = [15.0, 10.0, 5.0, 2.0]  # x2 < x1
    masks[3] = False
    check(masks, boxes)


def test_masks_outside_their_boxes_are_encoded_whole() -> None:
    rng = np.random.default_rng(2)
    masks, boxes = blobs(rng, 6, 32, 24, margin=0.0)
    masks[1, 0, 0] = masks[1, -1, -1] = True  # beyond its box, as RTMDet-Ins' may be
    boxes[1] = [10.0, 10.0, 14.0, 14.0]
    masks[3] = rng.random((32, 24)) < 0.2  # everywhere, with a box that holds none of it
    boxes[3] = [0.0, 0.0, 0.0, 0.0]
    boxes[4] = np.nan  # a box that is no box
    masks[4, 5:9, 5:9] = True
    check(masks, boxes)
    # Just beyond the one pixel of margin.
    ring = np.zeros((1, 16, 16), bool)
    ring[0, 4:12, 4:12] = True
    ring[0, 2, 6] = True
    check(ring, np.array([[4.0, 4.0, 12.0, 12.0]]))
    # Pixels on the rows next to the region, in neighbouring columns: apart in the image,
    # adjacent in a crop that took those rows in.
    beside = np.zeros((1, 16, 16), bool)
    beside[0, 13, 6] = beside[0, 2, 7] = True
    check(beside, np.array([[4.0, 4.0, 12.0, 12.0]]))


def test_empty_masks_none_and_one_pixel_images() -> None:
    empty = np.zeros((3, 5, 6), bool)
    check(empty, np.array([[1.0, 1.0, 4.0, 3.0], [0.0, 0.0, 6.0, 5.0], [2.0, 2.0, 2.0, 2.0]]))
    assert encode_masks(np.zeros((0, 5, 6), bool), np.zeros((0, 4))) == []
    assert encode_masks(torch.zeros((0, 5, 6), dtype=torch.bool), torch.zeros((0, 4))) == []
    pixel = np.array([[[True]], [[False]]])
    for box in ([0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5], [-3.0, -3.0, -2.0, -2.0]):
        check(pixel, np.array([box, box]))


def test_other_inputs() -> None:
    rng = np.random.default_rng(3)
    masks, boxes = blobs(rng, 4, 12, 10)
    expected = reference(masks)
    # Not C-contiguous, and uint8 (encoded whole, cast as mmdet casts).
    strided = np.ascontiguousarray(masks.transpose(0, 2, 1)).transpose(0, 2, 1)
    assert encode_masks(strided, boxes) == expected
    assert encode_masks(masks.astype(np.uint8), boxes) == expected == encode_whole(masks)
    with pytest.raises(ValueError, match=r"boxes of shape \(3, 4\) for 4 masks"):
        encode_masks(masks, boxes[:3])
