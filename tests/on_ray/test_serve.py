"""`python -m on_ray serve` for real: the command started once for the module (a local Ray with
2 CPUs, Serve on a free loopback port), real HTTP, and the page in Debian's headless chromium."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import requests

from tests.conftest import TINY_SYNTHETIC

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# A long batch wait: requests sent together are batched together, so the tests can tell.
SERVER_ARGS = ["--num-cpus", "2", "--max-batch-size", "8", "--batch-wait-ms", "300"]
SERVER_ARGS += ["--max-image-bytes", "300000", "--max-image-pixels", "1000000"]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


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
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """The URL of `python -m on_ray serve CHECKPOINT`, run as a user runs it; at the end, its
    Ctrl-C must stop Serve and Ray cleanly."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-m", "on_ray", "serve", str(checkpoint), "--port", str(port)]
    with log.open("w") as out:
        process = subprocess.Popen(command + SERVER_ARGS, cwd=REPO, stdout=out, stderr=out)
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


def post(
    url: str, body: bytes, query: str = "", content_type: str = "image/png"
) -> requests.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return requests.post(f"{url}v1/detect{query}", data=body, headers=headers, timeout=60)


def together(url: str, bodies: list[bytes], query: str = "") -> list[requests.Response]:
    """The bodies posted at once (one client each)."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: post(url, body, query), bodies))


def assert_good(url: str, image: Path) -> None:
    reply = post(url, image.read_bytes(), "?score_thr=0")
    assert reply.status_code == 200, reply.text
    assert reply.json()["detections"], reply.text


def assert_same_detections(got: list[dict], expected: list[dict], name: str) -> None:
    """The same detections: each expected one matched once by label, mask, box and score
    within 1e-4 (a batch's floating-point sums differ from one image's in the last bits, which
    may swap two detections of nearly equal scores)."""
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


def test_answers_equal_predict(
    server: str, checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    """Every image of a mixed-size batch gets what predict (batch 1) writes for it."""
    from utils.inference.inputs import collect_inputs
    from utils.inference.predict import find_export, predict

    predict(find_export(checkpoint), collect_inputs([str(p) for p in images]), tmp_path, 1,
            device="cpu", max_rendered=0)  # fmt: skip
    index = json.loads((tmp_path / "images.json").read_text())
    ids = {Path(image["file_name"]).name: image["id"] for image in index["images"]}
    boxes = json.loads((tmp_path / "results.bbox.json").read_text())
    masks = json.loads((tmp_path / "results.segm.json").read_text())
    replies = together(server, [p.read_bytes() for p in images], "?score_thr=0")
    assert max(int(r.headers["X-Batch-Requests"]) for r in replies) > 1
    for path, reply in zip(images, replies, strict=True):
        assert reply.status_code == 200, reply.text
        answer = reply.json()
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
    """A 200 x 120 image (padded to 96 x 128) gets the same answer alone and batched with
    128 x 128 images, which mmdet's own batching would pad it to."""
    from utils.inference.inputs import collect_inputs
    from utils.inference.predict import find_export, predict

    wide = images[4].read_bytes()
    alone = post(server, wide, "?score_thr=0")
    assert alone.status_code == 200 and alone.headers["X-Batch-Requests"] == "1"
    crowd = [wide, *(p.read_bytes() for p in images[:4]), wide]
    replies = together(server, crowd, "?score_thr=0")
    assert int(replies[0].headers["X-Batch-Requests"]) > 1
    assert int(replies[0].headers["X-Batch-Size"]) >= 2  # with its twin, in one forward pass
    for reply in (replies[0], replies[-1]):
        assert reply.json()["image"] == alone.json()["image"]
        assert_same_detections(reply.json()["detections"], alone.json()["detections"], "wide")
    # The test can fail: in one padded batch with them, predict's answer for it moves.
    inputs = collect_inputs([str(images[4]), *(str(p) for p in images[:4])])
    predict(find_export(checkpoint), inputs, tmp_path, 5, device="cpu", max_rendered=0)
    boxes = json.loads((tmp_path / "results.bbox.json").read_text())
    padded = [b["bbox"] for b in boxes if b["image_id"] == 0]
    served = [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in
              (d["bbox"] for d in alone.json()["detections"])]  # fmt: skip
    assert len(padded) != len(served) or not np.allclose(padded, served, atol=1e-3)


def test_concurrent_requests_are_batched(server: str, images: list[Path]) -> None:
    replies = together(server, [images[i % 4].read_bytes() for i in range(16)], "?masks=none")
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert all("mask" not in d for r in replies for d in r.json()["detections"])
    assert max(int(r.headers["X-Batch-Size"]) for r in replies) > 1


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


def test_drawing_model_health_and_routes(server: str, images: list[Path]) -> None:
    reply = post(server, images[0].read_bytes(), "?draw=1&score_thr=0")
    assert reply.status_code == 200 and reply.headers["Content-Type"] == "image/png"
    assert min(PIL.Image.open(io.BytesIO(reply.content)).size) >= 512  # drawn upscaled
    model = requests.get(f"{server}v1/model", timeout=10).json()
    assert model["classes"] == ["circle", "square", "triangle"] and model["masks"]
    assert model["batches_trained"] == 2 and model["score_thr"] == 0.3
    assert (model["max_batch_size"], model["batch_wait_ms"]) == (8, 300)
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
