"""The serving tests' client side: HTTP posts (one image, several, many clients at once), the
answers compared with `predict`'s, and Ray's metrics read back."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import requests


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def post(
    url: str, body: bytes, query: str = "", content_type: str = "image/png"
) -> requests.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return requests.post(f"{url}v1/detect{query}", data=body, headers=headers, timeout=60)


def together(url: str, bodies: list[bytes], query: str = "") -> list[requests.Response]:
    """The bodies posted at once (one client each, released together by a barrier)."""
    barrier = threading.Barrier(len(bodies))

    def send(body: bytes) -> requests.Response:
        barrier.wait(timeout=60)
        return post(url, body, query)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


def post_many(url: str, bodies: list[bytes], query: str = "") -> requests.Response:
    """One request with the bodies as the repeated multipart field `image`."""
    files = [("image", (f"{i}.png", body, "image/png")) for i, body in enumerate(bodies)]
    return requests.post(f"{url}v1/detect{query}", files=files, timeout=120)


def assert_same_detections(got: list[dict], expected: list[dict], name: str) -> None:
    """The same detections: each expected one matched once by label, mask, box and score
    within 1e-4 (predict writes boxes as x, y, width, height, converted back here)."""
    assert len(got) == len(expected), name
    left = list(got)
    for want in expected:
        match = next(
            (d for d in left
             if d["label"] == want["label"] and d.get("mask") == want.get("mask")
             and np.allclose(d["bbox"], want["bbox"], atol=1e-4)
             and abs(d["score"] - want["score"]) < 1e-4),
            None,
        )  # fmt: skip
        assert match is not None, f"{name}: {want['bbox']} {want['score']} not answered"
        left.remove(match)


def predict_here(
    server: str, checkpoint: Path, paths: list[Path], out: Path, batch_size: int
) -> None:
    """`predict` in this process with the replica's torch threads: a CPU kernel may split its
    sums by thread, and at score_thr=0 that rounding changes which near-equal proposals win."""
    import torch

    from utils.inference.inputs import collect_inputs
    from utils.inference.predict import find_export, predict

    threads = requests.get(f"{server}v1/model", timeout=10).json()["torch_threads"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        predict(find_export(checkpoint), collect_inputs([str(p) for p in paths]), out, batch_size,
                device="cpu", max_rendered=0)  # fmt: skip
    finally:
        torch.set_num_threads(before)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Ray's metrics on the node's export port: (name, route/status/le tags) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            tags = tuple(sorted((k, v) for k, v in sample.labels.items()
                                if k in ("route", "status", "le")))  # fmt: skip
            values[(sample.name, tags)] = sample.value
    return values
