"""The `serve` command's arguments; Ray and the model load only when it runs."""

from __future__ import annotations

import argparse

from utils.inference.commands import positive_int
from utils.inference.serving_api import Settings

DEFAULTS = Settings()


def replica_range(text: str) -> tuple[int, int]:
    """An argparse type: `MIN,MAX` replicas, 0 <= MIN <= MAX, MAX >= 1."""
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN,MAX (e.g. 1,4)") from None
    if not 0 <= low <= high or high < 1:
        raise argparse.ArgumentTypeError(f"{text}: use 0 <= MIN <= MAX and MAX >= 1")
    return low, high


def arguments(parser: argparse.ArgumentParser) -> None:
    """The serve command's arguments."""
    parser.add_argument(
        "checkpoint",
        help="checkpoint folder (Determined or Ray, with mmdet/ inside), an export folder "
        "(model.pth + config.py), or a Determined checkpoint UUID fetched before",
    )
    scaling = parser.add_mutually_exclusive_group()
    scaling.add_argument("--replicas", type=positive_int, default=1, help="replicas (default 1)")
    scaling.add_argument(
        "--autoscale", type=replica_range, metavar="MIN,MAX", help="replicas scaled by load"
    )
    parser.add_argument(
        "--max-batch-size",
        type=positive_int,
        default=DEFAULTS.max_batch_size,
        help=f"images per batch (default {DEFAULTS.max_batch_size})",
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=DEFAULTS.batch_wait_ms,
        help=f"how long a batch waits to fill (default {DEFAULTS.batch_wait_ms:g})",
    )
    parser.add_argument(
        "--score-thr",
        type=float,
        default=DEFAULTS.score_thr,
        help=f"answer detections scoring above it, unless a request says (default "
        f"{DEFAULTS.score_thr})",
    )
    parser.add_argument("--device", help="e.g. cuda:0 or cpu (default: CUDA when available)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=positive_int, default=8000, help="HTTP port (8000)")
    parser.add_argument(
        "--max-image-bytes",
        type=positive_int,
        default=DEFAULTS.max_image_bytes,
        help=f"larger uploads get 413 (default {DEFAULTS.max_image_bytes})",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=positive_int,
        default=DEFAULTS.max_image_pixels,
        help=f"larger images get 413 (default {DEFAULTS.max_image_pixels})",
    )
    parser.add_argument(
        "--max-images",
        type=positive_int,
        default=DEFAULTS.max_images,
        help=f"images per request, as repeated multipart fields (default {DEFAULTS.max_images})",
    )
    parser.add_argument(
        "--shape-batches",
        action="store_true",
        help="one forward pass per padded shape instead of per image: faster on a GPU, but an "
        "answer then equals the image's alone only up to float rounding",
    )
    parser.add_argument(
        "--num-cpus", type=positive_int, help="CPUs of the local Ray (default: all of them)"
    )
    parser.add_argument(
        "--metrics-port", type=positive_int, help="Ray's metrics export port (default: free)"
    )


def serve(args: argparse.Namespace) -> None:
    """Serve until Ctrl-C."""
    from on_ray import serve as serving
    from utils.base.errors import PredictError

    if not 0 <= args.score_thr <= 1:
        raise PredictError(f"--score-thr {args.score_thr}: use a number from 0 to 1.")
    if not 0 <= args.batch_wait_ms <= 10_000:
        raise PredictError(f"--batch-wait-ms {args.batch_wait_ms}: use 0 to 10000.")
    settings = Settings(
        score_thr=args.score_thr,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_images=args.max_images,
        device=args.device,
        shape_batches=args.shape_batches,
    )
    serving.run(
        args.checkpoint,
        settings,
        replicas=args.replicas,
        autoscale=args.autoscale,
        host=args.host,
        port=args.port,
        num_cpus=args.num_cpus,
        metrics_port=args.metrics_port,
    )
