"""COCO run-length encoding of binary masks, equal to mmdet's `encode_mask_results`, fast.

Validation encodes every predicted mask once (`utils.evaluation.evaluator.CocoEvaluator.update`),
and so
does batch inference; the run boundaries are found with numpy on the masks as they are stored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils


def encode_masks(masks: torch.Tensor | np.ndarray) -> list[dict[str, Any]]:
    """COCO RLEs of (N, H, W) binary masks, equal to mmdet's `encode_mask_results`.

    Masks on the CPU are scanned whole. Masks on an accelerator are first cut there to the part
    that holds pixels, so that only those crops (a detector's masks are mostly background, up to
    100 per image at full image size) cross to the host and get scanned.
    """
    if isinstance(masks, np.ndarray) or masks.device.type == "cpu":
        return encode_whole(np.asarray(masks))
    return encode_cropped(masks)


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


def encode_cropped(masks: torch.Tensor) -> list[dict[str, Any]]:
    """`encode_masks` scanning only each mask's rows and columns that hold pixels.

    Each crop keeps one background row above and below where the mask has one, and is laid out
    column by column as RLE runs. A crop pixel maps back to its place in the whole mask, and the
    background rows cut away lie only between a pixel and the next background pixel: a pixel run
    starts at its first pixel, a background run one past the pixel before it.
    """
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
    crops = [
        masks[i, t : t + ht, x0[i] : x1[i]].T.reshape(-1)
        for i, t, ht in zip(index, top, height, strict=True)
    ]
    stream = torch.cat(crops).cpu().numpy() if crops else np.zeros(0, bool)
    starts = np.cumsum([0, *(ht * (x1[i] - x0[i]) for i, ht in zip(index, height, strict=True))])
    # Changes inside a crop (a change at a crop's start is between two masks).
    change = np.flatnonzero(stream[1:] != stream[:-1]) + 1
    change = change[~np.isin(change, starts)]
    to_background = ~stream[change]
    first, last = starts[:-1], starts[1:] - 1  # crops are never empty
    first, last = first[stream[first]], last[stream[last]]  # a crop starting, ending with a pixel
    pixel = np.concatenate([change - to_background, first, last])
    after = np.concatenate([to_background, np.zeros(len(first), bool), np.ones(len(last), bool)])
    crop = np.searchsorted(starts, pixel, side="right") - 1
    col, row = np.divmod(pixel - starts[crop], np.asarray(height, dtype=np.int64)[crop])
    end = (np.asarray(x0)[index][crop] + col) * h + np.asarray(top)[crop] + row + after
    inside = end < h * w  # a run ending at the mask's end is added by `rles_from_run_ends`
    owner = np.asarray(index, dtype=np.int64)[crop]
    return rles_from_run_ends(owner[inside], end[inside], n, h, w)


def rles_from_run_ends(owner: np.ndarray, end: np.ndarray, n: int, h: int, w: int) -> list[dict]:
    """Compressed RLEs of `n` masks from where their runs end (mask `owner`, pixel `end`).

    The runs alternate background and pixels, starting with background; an `end` of 0 gives
    the empty leading run of a mask whose first pixel is set. Every mask ends at `h * w`.
    """
    every = np.arange(n)
    owner = np.concatenate([owner, every])
    end = np.concatenate([end, np.full(n, h * w)])
    order = np.lexsort((end, owner))
    owner, end = owner[order], end[order]
    first = np.searchsorted(owner, every)
    begin = np.concatenate([[0], end[:-1]])
    begin[first] = 0
    counts = (end - begin).tolist()
    bounds = [*first.tolist(), len(counts)]
    runs = [{"counts": counts[bounds[i] : bounds[i + 1]], "size": [h, w]} for i in range(n)]
    return mask_utils.frPyObjects(runs, h, w)
