"""`python -m on_ray serve` for real: the command started once for the module (a local Ray with
2 CPUs, Serve on a free loopback port), real HTTP, and the page in Debian's headless chromium.

Batching is made observable without depending on timing: several images of one request are
handed to the batch at once (one batch, whatever the machine's load), and concurrent requests
start together behind a barrier, well inside the test server's long batch window."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import requests

from on_ray.serve_http import QUERY_KEYS
from tests.conftest import TINY_SYNTHETIC
from tests.on_ray.serve_client import (
    assert_same_detections,
    png,
    post,
    post_many,
    predict_here,
    scrape,
    together,
)
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# A long batch wait: requests sent together are batched together, so the tests can tell.
SERVER_ARGS = ["--num-cpus", "2", "--max-batch-size", "8", "--batch-wait-ms", "500"]
SERVER_ARGS += ["--max-image-bytes", "300000", "--max-image-pixels", "1000000"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(synthetic_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four 128 px validation images of the trained run's data, then copies of other sizes:
    200 x 120 and 96 x 160 (padded to other shapes than 128 x 128) and 256 x 256 (resized to
    128 px: the answer's boxes are in its own pixels)."""
    from utils.data.synthetic import SyntheticSpec, ensure_dataset

    root = ensure_dataset(synthetic_cache, SyntheticSpec(**TINY_SYNTHETIC))
    sources = sorted((root / "val").glob("*.png"))[:4]
    assert len(sources) == 4, root
    folder = tmp_path_factory.mktemp("serve-images")
    paths = []
    for source, size in [*((s, None) for s in sources), (sources[0], (200, 120)),
                         (sources[1], (96, 160)), (sources[2], (256, 256))]:  # fmt: skip
        image = PIL.Image.open(source).convert("RGB")
        paths.append(folder / f"{source.stem}_{len(paths)}.png")
        (image.resize(size) if size else image).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def checkpoint(trained_maskrcnn: Path) -> Path:
    (folder,) = (trained_maskrcnn / "determined").iterdir()
    return folder


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(checkpoint: Path, metrics_port: int, tmp_path_factory: pytest.TempPathFactory):
    """The URL of `python -m on_ray serve CHECKPOINT`, run as a user runs it; at the end, its
    Ctrl-C must stop Serve and Ray cleanly."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-m", "on_ray", "serve", str(checkpoint), "--port", str(port)]
    command += ["--metrics-port", str(metrics_port)]
    # Ray reports metrics every 10 s by default; every second here, so the test waits less.
    env = {**os.environ, "RAY_metrics_report_interval_ms": "1000"}
    with log.open("w") as out:
        process = subprocess.Popen(command + SERVER_ARGS, cwd=REPO, env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 150
    try:
        while f"at {url} (page)" not in log.read_text():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
    except AssertionError:
        process.kill()  # its local Ray goes with it
        process.wait()
        raise
    yield url
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert log.read_text().rstrip().endswith("Stopped."), log.read_text()[-3000:]


def assert_good(url: str, image: Path) -> None:
    reply = post(url, image.read_bytes(), "?score_thr=0")
    assert reply.status_code == 200, reply.text
    assert reply.json()["detections"], reply.text


def test_answers_equal_predict(
    server: str, checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    """Every image of a mixed-size batch gets what predict (batch 1) writes for it."""
    predict_here(server, checkpoint, images, tmp_path, 1)
    index = json.loads((tmp_path / "images.json").read_text())
    ids = {Path(image["file_name"]).name: image["id"] for image in index["images"]}
    boxes = json.loads((tmp_path / "results.bbox.json").read_text())
    masks = json.loads((tmp_path / "results.segm.json").read_text())
    reply = post_many(server, [p.read_bytes() for p in images], "?score_thr=0")
    assert reply.status_code == 200, reply.text
    # The images of one request go to the batch together: one batch, on any machine.
    assert reply.headers["X-Batch-Requests"] == ",".join([str(len(images))] * len(images))
    for path, answer in zip(images, reply.json()["results"], strict=True):
        width, height = PIL.Image.open(path).size
        assert answer["image"] == {"width": width, "height": height}
        expected = [b for b in boxes if b["image_id"] == ids[path.name]]
        expected_masks = [m for m in masks if m["image_id"] == ids[path.name]]
        assert len(expected) > 0, path.name
        wanted = [
            {"bbox": [x, y, x + w, y + h], "score": box["score"], "label": box["category_id"] - 1,
             "mask": mask["segmentation"]}
            for (x, y, w, h), box, mask in
            zip((b["bbox"] for b in expected), expected, expected_masks, strict=True)
        ]  # fmt: skip
        assert_same_detections(answer["detections"], wanted, path.name)
        classes = ("circle", "square", "triangle")
        assert all(d["class"] == classes[d["label"]] for d in answer["detections"])


def test_an_answer_does_not_depend_on_its_batch(
    server: str, checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    """A 200 x 120 image (padded to 96 x 128) gets, bit for bit, the same answer alone and
    batched with its twin and 128 x 128 images, which mmdet's own batching would pad it to."""
    wide = images[4].read_bytes()
    alone = post(server, wide, "?score_thr=0")
    assert alone.status_code == 200 and alone.headers["X-Batch-Requests"] == "1"
    crowd = [wide, *(p.read_bytes() for p in images[:4]), wide]
    reply = post_many(server, crowd, "?score_thr=0")
    assert reply.headers["X-Batch-Requests"] == "6,6,6,6,6,6"  # all six in one batch
    results = reply.json()["results"]
    assert results[0] == alone.json() and results[-1] == alone.json()
    # The test can fail: in one padded batch with them, predict's answer for it moves.
    predict_here(server, checkpoint, [images[4], *images[:4]], tmp_path, 5)
    boxes = json.loads((tmp_path / "results.bbox.json").read_text())
    padded = [b["bbox"] for b in boxes if b["image_id"] == 0]
    served = [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in
              (d["bbox"] for d in alone.json()["detections"])]  # fmt: skip
    assert len(padded) != len(served) or not np.allclose(padded, served, atol=1e-3)


def test_concurrent_requests_are_batched(server: str, images: list[Path]) -> None:
    replies = together(server, [images[i % 4].read_bytes() for i in range(16)], "?masks=none")
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert all("mask" not in d for r in replies for d in r.json()["detections"])
    assert max(int(r.headers["X-Batch-Requests"]) for r in replies) > 1
    assert all(r.headers["X-Batch-Size"] == "1" for r in replies)  # a forward pass per image


def bad_inputs(images: list[Path]) -> dict[str, tuple[bytes, str, str, int, str]]:
    """name: (body, query, content type, status, words of the message)."""
    good = images[0].read_bytes()
    big = png(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8))
    many = png(np.zeros((1001, 1000, 3), np.uint8))
    return {
        "not an image": (b"hello, world", "", "image/png", 400, "not a decodable image"),
        "truncated": (good[: len(good) // 2], "", "image/png", 400, "not a decodable image"),
        "empty": (b"", "", "image/png", 400, "empty"),
        "text": (good, "", "text/plain", 415, "Content-Type text/plain"),
        "no type": (good, "", "", 415, "Content-Type missing"),
        "too many bytes": (big, "", "image/png", 413, "300000 bytes"),
        "too many pixels": (many, "", "image/png", 413, "1001000 pixels"),
        "score_thr 2": (good, "?score_thr=2", "image/png", 422, "score_thr=2"),
        "score_thr nan": (good, "?score_thr=nan", "image/png", 422, "score_thr=nan"),
        "max_detections": (good, "?max_detections=-1", "image/png", 422, "max_detections=-1"),
        "masks": (good, "?masks=poly", "image/png", 422, "masks=poly"),
        "draw": (good, "?draw=yes", "image/png", 422, "draw=yes"),
        "typo": (good, "?score_th=0.5", "image/png", 422, "did you mean score_thr"),
    }


@pytest.mark.parametrize("case", list(bad_inputs([Path(__file__)])))
def test_bad_input_gets_a_json_error_and_the_service_lives(
    server: str, images: list[Path], case: str
) -> None:
    body, query, content_type, status, words = bad_inputs(images)[case]
    reply = post(server, body, query, content_type)
    assert reply.status_code == status, reply.text
    assert reply.json()["status"] == status and words in reply.json()["error"], reply.text
    assert_good(server, images[0])


def test_multipart_upload_and_its_errors(server: str, images: list[Path]) -> None:
    files = {"image": ("a.png", images[0].read_bytes(), "image/png")}
    reply = requests.post(f"{server}v1/detect?score_thr=0", files=files, timeout=60)
    assert reply.status_code == 200 and reply.json()["detections"], reply.text
    files = {"picture": ("a.png", images[0].read_bytes(), "image/png")}
    reply = requests.post(f"{server}v1/detect", files=files, timeout=60)
    assert reply.status_code == 400 and "no field `image` (fields: picture)" in reply.text
    assert_good(server, images[0])


def test_a_request_failing_inside_a_batch_fails_alone(server: str, images: list[Path]) -> None:
    good = [p.read_bytes() for p in images[:6]]
    truncated = good[0][: len(good[0]) // 2]  # its header reads: it fails when decoded
    sliver = png(np.full((1, 3000, 3), 128, np.uint8))  # the 128 px resize makes it 0 px high
    replies = together(server, [*good[:3], truncated, sliver, *good[3:]])
    statuses = [r.status_code for r in replies]
    assert statuses == [200] * 3 + [400, 400] + [200] * 3, [r.text for r in replies]
    assert "not a decodable image" in replies[3].json()["error"]
    assert "test pipeline" in replies[4].json()["error"]
    assert all(int(r.headers["X-Batch-Requests"]) > 1 for r in replies[3:5])
    assert_good(server, images[0])


def test_several_images_in_one_request(server: str, images: list[Path]) -> None:
    """Answers in the order sent, each image's failure its own entry; one batch."""
    good = [p.read_bytes() for p in images[:2]]
    truncated = good[0][: len(good[0]) // 2]  # fails when decoded, inside the batch
    big = png(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8))
    reply = post_many(server, [good[0], truncated, good[1], big, b"hello"], "?masks=none")
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert [r.get("status") for r in results] == [None, 400, None, 413, 400], results
    for body, result in zip(good, results[::2], strict=False):
        assert result == post(server, body, "?masks=none").json()
    assert "not a decodable image" in results[1]["error"] and "300000 bytes" in results[3]["error"]
    assert reply.headers["X-Batch-Requests"] == "3,3,3,0,0"  # the three that reached the batch
    assert reply.headers["X-Batch-Size"] == "1,0,1,0,0"
    tiny = png(np.zeros((8, 8, 3), np.uint8))
    reply = post_many(server, [tiny] * 17)
    assert reply.status_code == 413 and "17 images, over the limit of 16" in reply.text
    reply = post_many(server, good, "?draw=1")
    assert reply.status_code == 422 and "draw=1" in reply.json()["error"]
    assert_good(server, images[0])


def test_openapi_and_docs(server: str) -> None:
    spec = requests.get(f"{server}openapi.json", timeout=10).json()
    detect = spec["paths"]["/v1/detect"]["post"]
    assert [p["name"] for p in detect["parameters"]] == list(QUERY_KEYS)
    assert "multipart/form-data" in detect["requestBody"]["content"]
    assert "image/png" in detect["responses"]["200"]["content"]
    assert "ErrorAnswer" in json.dumps(detect["responses"]["422"])
    schemas = spec["components"]["schemas"]
    assert {"bbox", "score", "label", "class", "mask"} <= set(schemas["Detection"]["properties"])
    assert "Detections" in json.dumps(detect["responses"]["200"])
    assert set(spec["paths"]) == {"/healthz", "/v1/model", "/v1/detect"}
    docs = requests.get(f"{server}docs", timeout=10)
    assert docs.status_code == 200 and "openapi.json" in docs.text


def test_metrics_are_exported(server: str, metrics_port: int, images: list[Path]) -> None:
    """Our metrics read back from Ray's Prometheus endpoint: requests by status, images per
    batch and per forward pass, queue wait, detections per image."""
    ok = (("route", "/v1/detect"), ("status", "200"))
    bad = (("route", "/v1/detect"), ("status", "422"))
    before = scrape(metrics_port)
    reply = post_many(server, [p.read_bytes() for p in images[:3]], "?masks=none")
    assert reply.status_code == 200
    assert post(server, images[0].read_bytes(), "?score_thr=7").status_code == 422
    wanted = {
        ("ray_detector_requests_total", ok): 1,
        ("ray_detector_requests_total", bad): 1,
        ("ray_detector_request_seconds_count", (("route", "/v1/detect"),)): 2,
        ("ray_detector_batch_images_count", ()): 1,
        ("ray_detector_forward_pass_images_count", ()): 3,
        ("ray_detector_queue_wait_seconds_count", ()): 3,
        ("ray_detector_detections_per_image_count", ()): 3,
    }
    deadline = time.monotonic() + 30  # Ray exports every second (the server's environment)
    while True:
        after = scrape(metrics_port)
        grown = {key: after.get(key, 0) - before.get(key, 0) for key in wanted}
        if all(grown[key] >= n for key, n in wanted.items()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert all(grown[key] >= n for key, n in wanted.items()), grown
    # A batch of 3 images, each in a forward pass of its own.
    assert after[("ray_detector_batch_images_bucket", (("le", "3.0"),))] >= 1
    assert after[("ray_detector_forward_pass_images_bucket", (("le", "1.0"),))] >= 3


def test_drawing_model_health_and_routes(server: str, images: list[Path]) -> None:
    reply = post(server, images[0].read_bytes(), "?draw=1&score_thr=0")
    assert reply.status_code == 200 and reply.headers["Content-Type"] == "image/png"
    assert min(PIL.Image.open(io.BytesIO(reply.content)).size) >= 512  # drawn upscaled
    model = requests.get(f"{server}v1/model", timeout=10).json()
    assert model["classes"] == ["circle", "square", "triangle"] and model["masks"]
    assert model["batches_trained"] == 2 and model["score_thr"] == 0.3
    assert (model["max_batch_size"], model["batch_wait_ms"]) == (8, 500)
    assert requests.get(f"{server}healthz", timeout=10).json() == {"status": "ok"}
    page = requests.get(server, timeout=10)
    assert page.headers["Content-Type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched elsewhere
    assert requests.get(f"{server}nowhere", timeout=10).status_code == 404
    assert requests.get(f"{server}v1/detect", timeout=10).status_code == 405


def test_page_in_headless_chromium(server: str, images: list[Path], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), "Debian's chromium: scripts/setup_env.sh installs it (as root)"
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page()
            page.goto(server)
            page.wait_for_function(
                "document.getElementById('model').textContent.includes('3 classes')"
            )
            page.set_input_files("#file", str(images[0]))
            page.wait_for_function(
                "document.getElementById('status').textContent.includes('detections')"
            )
            page.eval_on_selector(
                "#threshold", "e => { e.value = 0; e.dispatchEvent(new Event('input')); }"
            )
            rows = page.locator("#detections tr")
            assert rows.count() > 0
            assert rows.first.inner_text().split("\t")[1] in ("circle", "square", "triangle")
            drawn = page.evaluate(
                "() => { const c = document.getElementById('canvas');"
                " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                " return [c.width, new Set(d).size]; }"
            )
            assert drawn[0] >= 512 and drawn[1] > 10, drawn
            assert not page.is_visible("#error")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            page.set_input_files("#file", str(bad))
            page.wait_for_selector("#error", state="visible")
            assert "Error 400" in page.inner_text("#error")
            assert "not a decodable image" in page.inner_text("#error")
            page.screenshot(path=str(tmp_path / "page-error.png"), full_page=True)
        finally:
            browser.close()
    print(f"screenshots: {tmp_path / 'page.png'}, {tmp_path / 'page-error.png'}")
