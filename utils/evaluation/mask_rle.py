"""COCO run-length encoding of binary masks, equal to mmdet's `encode_mask_results`, fast.

Validation encodes every predicted mask once (`utils.evaluation.evaluator.CocoEvaluator.update`),
and so does batch inference and serving. A detector's masks are mostly background: where each
mask's box is at hand, only the box region is scanned; otherwise the masks are scanned whole.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils


def encode_masks(
    masks: torch.Tensor | np.ndarray, boxes: torch.Tensor | np.ndarray | None = None
) -> list[dict[str, Any]]:
    """COCO RLEs of (N, H, W) binary masks, equal to mmdet's `encode_mask_results`.

    `boxes`: the masks' (N, 4) x1, y1, x2, y2 boxes in pixels (a detector's `bboxes`); with
    them, boolean masks on the CPU are encoded from their box regions (`encode_in_boxes`), else
    scanned whole. Masks on an accelerator are first cut there to the part that holds pixels,
    so that only those crops cross to the host and get scanned.
    """
    if isinstance(masks, torch.Tensor) and masks.device.type != "cpu":
        return encode_cropped(masks)
    masks = np.asarray(masks)
    if boxes is None or masks.dtype != bool:  # other dtypes are cast as mmdet casts them
        return encode_whole(masks)
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().numpy()
    return encode_in_boxes(masks, np.asarray(boxes))


def encode_whole(masks: np.ndarray) -> list[dict[str, Any]]:
    """`encode_masks` scanning each mask whole, row-major as it is stored.

    RLE runs down the columns; pycocotools needs the masks transposed for that, and the copy
    costs as much as the encoding. The run boundaries are found on the row-major masks instead:
    vertically adjacent pixels are `w` apart, and a column's last pixel precedes the next top one.
    """
    n, h, w = masks.shape
    if not n:
        return []
    # mmdet casts to uint8; a bool array is already one byte per pixel.
    masks = masks.view(np.uint8) if masks.dtype == bool else masks.astype(np.uint8)
    flat = masks.reshape(n, h * w)
    inner = np.flatnonzero(flat[:, w:] != flat[:, :-w])
    owner, pixel = np.divmod(inner, h * w - w)
    rows, cols = np.divmod(pixel, w)
    wrap_owner, wrap_col = np.nonzero(masks[:, -1, :-1] != masks[:, 0, 1:])
    ones_first = np.flatnonzero(masks[:, 0, 0])  # the leading run of zeros is empty
    owner = np.concatenate([owner, wrap_owner, ones_first])
    # Where each run ends: at a change (the end of the mask is added by `rles_from_run_ends`).
    end = np.concatenate([cols * h + rows + 1, (wrap_col + 1) * h, np.zeros_like(ones_first)])
    return rles_from_run_ends(owner, end, n, h, w)


def encode_in_boxes(masks: np.ndarray, boxes: np.ndarray) -> list[dict[str, Any]]:
    """`encode_masks` of boolean masks scanning only each mask's box region, with one pixel of
    margin (a pasted mask may spill half a pixel over its box).

    Exact for any mask: one count of all pixels tells whether every mask lies in its region
    (RTMDet-Ins' masks, for one, need not); a mask that does not is encoded whole.
    """
    n, h, w = masks.shape
    if boxes.shape != (n, 4):
        raise ValueError(
            f"boxes of shape {boxes.shape} for {n} masks: give one x1, y1, x2, y2 box per mask."
        )
    if not n:
        return []
    # Any region gives the exact encoding (the count below), so a NaN coordinate may be read as 0.
    boxes = np.nan_to_num(boxes.astype(np.float64), nan=0.0)
    low = np.clip(np.floor(boxes[:, :2]) - 1, 0, [w, h]).astype(np.int64)
    high = np.clip(np.ceil(boxes[:, 2:]) + 1, low, [w, h]).astype(np.int64)
    (x0, y0), (x1, y1) = low.T, high.T
    index = np.flatnonzero((x1 > x0) & (y1 > y0))
    # Each crop has a background row above and below the region where the image has one, as
    # `rles_from_crops` needs: zeros here, as in the mask once it lies in its region.
    top = y0 - (y0 > 0)
    height = y1 + (y1 < h) - top
    sizes = (height * (x1 - x0))[index]
    starts = crop_starts(sizes)
    stream = np.zeros(stream_length(starts, sizes), np.uint8)
    data = np.ascontiguousarray(masks).view(np.uint8)  # rows as OpenCV reads them
    regions = np.stack([x0, x1, y0, y1, top, height])[:, index].T.tolist()
    for k, (i, (a, b, c, d, t, ht)) in enumerate(zip(index.tolist(), regions, strict=True)):
        crop = stream[starts[k] : starts[k] + sizes[k]].reshape(b - a, ht)  # column by column
        cv2.transpose(data[i, t : t + ht, a:b], dst=crop)  # twice numpy's speed
        crop[:, : c - t] = 0  # the background rows, counted below if they are not
        crop[:, d - t :] = 0
    outside = np.zeros(0, np.int64)
    if np.count_nonzero(stream) != np.count_nonzero(data):
        pixels = np.cumsum(stream)
        inside = np.zeros(n, np.int64)
        inside[index] = pixels[starts + sizes - 1] - pixels[starts - 1]
        outside = np.flatnonzero(np.count_nonzero(data.reshape(n, -1), axis=1) != inside)
        for k in np.flatnonzero(np.isin(index, outside)).tolist():
            stream[starts[k] : starts[k] + sizes[k]] = 0  # encoded whole below
    stream = stream.view(bool)
    rles = rles_from_crops(stream, starts, index, x0[index], top[index], height[index], h, w, n)
    for i, rle in zip(outside, encode_whole(masks[outside]), strict=True):
        rles[i] = rle
    return rles


def encode_cropped(masks: torch.Tensor) -> list[dict[str, Any]]:
    """`encode_masks` scanning only each mask's rows and columns that hold pixels, cut on the
    masks' device; each crop keeps one background row above and below where the mask has one."""
    n, h, w = masks.shape
    if not n:
        return []
    masks = masks.bool()
    cols, rows = masks.any(dim=1), masks.any(dim=2)
    extent = []
    for filled in (cols.to(torch.uint8), rows.to(torch.uint8)):
        extent += [filled.argmax(dim=1), filled.shape[1] - filled.flip(1).argmax(dim=1)]
    extent.append(cols.any(dim=1).to(extent[0].dtype))
    x0, x1, y0, y1, filled = torch.stack(extent).tolist()  # one transfer for all masks
    index = [i for i in range(n) if filled[i]]
    top = [max(y0[i] - 1, 0) for i in index]
    height = [min(y1[i] + 1, h) - t for i, t in zip(index, top, strict=True)]
    gap = masks.new_zeros(1)  # `rles_from_crops`' background before, between and after crops
    crops = [gap]
    for i, t, ht in zip(index, top, height, strict=True):
        crops += [masks[i, t : t + ht, x0[i] : x1[i]].T.reshape(-1), gap]
    stream = torch.cat(crops).cpu().numpy()
    index, top, height = (np.asarray(v, dtype=np.int64) for v in (index, top, height))
    left = np.asarray(x0, dtype=np.int64)[index]
    sizes = height * (np.asarray(x1, dtype=np.int64)[index] - left)
    return rles_from_crops(stream, crop_starts(sizes), index, left, top, height, h, w, n)


def crop_starts(sizes: np.ndarray) -> np.ndarray:
    """Where crops of `sizes` pixels start in a stream with one background pixel before each
    crop and after the last (a change at a crop's edge is then a change like any other)."""
    return np.cumsum(sizes + 1) - sizes


def stream_length(starts: np.ndarray, sizes: np.ndarray) -> int:
    return int(starts[-1] + sizes[-1] + 1) if len(sizes) else 1


def rles_from_crops(
    stream: np.ndarray,
    starts: np.ndarray,
    index: np.ndarray,
    left: np.ndarray,
    top: np.ndarray,
    height: np.ndarray,
    h: int,
    w: int,
    n: int,
) -> list[dict[str, Any]]:
    """Compressed RLEs of `n` masks of `h` x `w` from crops of some of them (masks `index`,
    ascending), laid out column by column in `stream` from `starts` (`crop_starts`): crop k's
    top left pixel is (`top[k]`, `left[k]`), it is `height[k]` rows high.

    Every pixel outside the crops must be background, and so must a crop's first and last rows
    unless they are the image's. A crop pixel then maps back to its place in the whole mask, and
    the background rows cut away lie only between a pixel and the next background pixel: a
    pixel run starts at its first pixel, a background run one past the pixel before it.
    """
    change = np.flatnonzero(stream[1:] != stream[:-1]) + 1
    to_background = ~stream[change]
    pixel = change - to_background
    crop = np.searchsorted(starts, pixel, side="right") - 1
    col, row = np.divmod(pixel - starts[crop], height[crop])
    end = (left[crop] + col) * h + top[crop] + row + to_background
    inside = end < h * w  # a run ending at the mask's end is added by `rles_from_run_ends`
    # In stream order: by mask, then by place in the mask.
    return rles_from_run_ends(index[crop][inside], end[inside], n, h, w, ordered=True)


def rles_from_run_ends(
    owner: np.ndarray, end: np.ndarray, n: int, h: int, w: int, ordered: bool = False
) -> list[dict]:
    """Compressed RLEs of `n` masks from where their runs end (mask `owner`, pixel `end`;
    `ordered`: sorted by both already).

    The runs alternate background and pixels, starting with background; an `end` of 0 gives
    the empty leading run of a mask whose first pixel is set. Every mask ends at `h * w`.
    """
    if not ordered:
        order = np.lexsort((end, owner))
        owner, end = owner[order], end[order]
    last = np.searchsorted(owner, np.arange(n), side="right")  # where each mask's ends stop
    end = np.insert(end, last, h * w)
    bounds = [0, *(last + np.arange(1, n + 1)).tolist()]
    begin = np.concatenate([[0], end[:-1]])
    begin[bounds[:-1]] = 0
    counts = (end - begin).astype(np.uint32)  # slices of an array: pycocotools' fast path
    runs = [{"counts": counts[bounds[i] : bounds[i + 1]], "size": [h, w]} for i in range(n)]
    return mask_utils.frPyObjects(runs, h, w)
