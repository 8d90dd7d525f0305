"""Online serving under load: `python -m on_ray serve` vs mmdet's `DetInferencer` behind a plain
HTTP handler, on loopback, same model export, same images.

The model is bench/exports.py's Mask R-CNN R18-FPN export with seeded initial weights: every
image gets the test_cfg's 100 detections with masks, so both sides do the full post-processing.
The images, 32 generated ones, are posted twice over: as generated (128 px PNGs, the model's test
scale) and at COCO's size (the same images as 640x480 JPEGs, which the config's test pipeline
resizes: decoding, resizing, pasting and encoding the masks at full size are then part of each
request). Each side runs as its own subprocess with the machine's CPUs, one at a time, in
alternating order; ours as one replica per CPU (`--replicas`, what docs/serving.md advises on a
CPU machine). Clients are threads of this process, each posting one image after the other
(closed loop). The baseline, started as `python -m bench.serve baseline CHECKPOINT PORT`,
answers one request at a time with `DetInferencer(image)` (batch 1), as a handler of Python's
`http.server` does.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import requests

from bench.exports import images_folder, make_export

REPO = Path(__file__).resolve().parent.parent
LEVELS = (1, 8, 32)
SIDES = ("ours", "baseline")
IMAGES = 32
# Requests per concurrency level (after 4 warm-up requests per side).
SIZES = {True: {1: 2, 8: 8, 32: 32, "repeats": 1}, False: {1: 40, 8: 96, 32: 160, "repeats": 3}}
BASELINE = "mmdet DetInferencer behind http.server, one image per request"
# One replica per CPU, each with one torch thread: inside a replica a second thread bought
# nothing here (docs/serving.md, Under load). No batch wait: its default.
OURS_ARGS = ("--replicas", str(os.cpu_count() or 1), "--max-batch-size", "8", "--score-thr", "0")
# The images as generated, and at COCO's size (JPEG, as COCO's are), resized by the test pipeline.
VARIANTS = ("128 px", "640x480")
# Lower is better for latency, higher for throughput (issue 26's goals).
GOALS = {"throughput": {1: 1.0, 8: 1.3, 32: 1.3}, "p50": {1: 1.1, 8: 1.0, 32: 1.0}}
GOALS["p99"] = {1: 1.2, 8: 1.2, 32: 1.2}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(side: str, export: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}  # both sides: all cores
    if side == "ours":
        command = [sys.executable, "-m", "on_ray", "serve", str(export), "--port", str(port)]
        command += OURS_ARGS
    else:
        command = [sys.executable, "-m", "bench.serve", "baseline", str(export), str(port)]
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the {side} server exited: {log.read_text()[-2000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok:
                return process
        except requests.RequestException:  # not listening yet, or Serve's app still starting
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the {side} server did not answer in 240 s: {log.read_text()[-2000:]}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()  # ours stops Serve and Ray on SIGTERM (exit 0); http.server exits
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def post(session: requests.Session, url: str, body: bytes) -> tuple[float, bytes]:
    start = time.perf_counter()
    reply = session.post(url, data=body, headers={"Content-Type": "image/png"}, timeout=120)
    if reply.status_code != 200:
        raise RuntimeError(f"{url} answered {reply.status_code}: {reply.text[:300]}")
    return time.perf_counter() - start, reply.content


def load(url: str, bodies: list[bytes], concurrency: int, count: int) -> dict[str, float]:
    """`count` requests by `concurrency` closed-loop clients: images/s, p50 and p99 latency."""
    sessions = [requests.Session() for _ in range(concurrency)]

    def client(k: int) -> list[float]:
        return [
            post(sessions[k], url, bodies[i % len(bodies)])[0] for i in range(k, count, concurrency)
        ]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = sorted(t for part in pool.map(client, range(concurrency)) for t in part)
    wall = time.perf_counter() - start
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    return {"throughput": count / wall, "p50": statistics.median(latencies), "p99": p99}


def detections(side: str, answer: bytes) -> int:
    data = json.loads(answer)
    return len(data["detections"] if side == "ours" else data["labels"])


def coco_sized(paths: list[Path]) -> list[bytes]:
    """The images as 640x480 JPEGs (quality 90)."""
    bodies = []
    for path in paths:
        image = cv2.resize(cv2.imread(str(path)), (640, 480), interpolation=cv2.INTER_LINEAR)
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode {path} as JPEG")
        bodies.append(jpeg.tobytes())
    return bodies


def measure(quick: bool, repeats: int | None = None) -> list[dict[str, Any]]:
    size = SIZES[quick]
    repeats = repeats or size["repeats"]
    results: dict[tuple[str, str, str, int], list[float]] = {}
    counts: dict[tuple[str, str], list[int]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        folder = Path(tmp)
        export = make_export(folder / "export")
        images = sorted(images_folder(folder, IMAGES).glob("*.png"))
        bodies = {"128 px": [path.read_bytes() for path in images], "640x480": coco_sized(images)}
        for rep in range(repeats):
            for side in ("ours", "baseline") if rep % 2 == 0 else ("baseline", "ours"):
                print(f"[bench.serve] {rep + 1}/{repeats} {side}", flush=True)
                port = free_port()
                process = start_server(side, export, port, folder / f"{side}-{rep}.log")
                url = f"http://127.0.0.1:{port}/v1/detect"
                try:
                    for variant in VARIANTS:
                        with requests.Session() as session:
                            warm = [post(session, url, body)[1] for body in bodies[variant][:4]]
                        counts[(side, variant)] = [detections(side, answer) for answer in warm]
                        for level in LEVELS:
                            figures = load(url, bodies[variant], level, size[level])
                            for key, value in figures.items():
                                results.setdefault((variant, side, key, level), []).append(value)
                finally:
                    stop_server(process)
    rows = []
    for variant in VARIANTS:
        ours, baseline = counts[("ours", variant)], counts[("baseline", variant)]
        notes = (
            f"{len(images)} generated images, {variant_note(variant)}; ours `python -m on_ray "
            f"serve {' '.join(OURS_ARGS)}` (one replica per CPU); requests per level "
            f"{', '.join(f'{level}: {size[level]}' for level in LEVELS)}; detections per image "
            f"of the first 4: ours {ours}, baseline {baseline} "
            f"({'the same' if ours == baseline else 'DIFFERENT'}); load average at the end "
            f"{os.getloadavg()[0]:.2f}"
        )
        rows += [
            row(results, variant, key, level, repeats, notes) for key in GOALS for level in LEVELS
        ]
    return rows


def variant_note(variant: str) -> str:
    if variant == "128 px":
        return "128 px PNGs (the model's test scale)"
    return "640x480 JPEGs (quality 90) resized by the config's test pipeline to its 128 px scale"


def row(
    results: dict[tuple[str, str, str, int], list[float]],
    variant: str,
    key: str,
    level: int,
    repeats: int,
    notes: str,
) -> dict[str, Any]:
    ours_runs, baseline_runs = (results[(variant, side, key, level)] for side in SIDES)
    ours, baseline = statistics.median(ours_runs), statistics.median(baseline_runs)
    ratio, goal = ours / baseline, GOALS[key][level]
    higher = key == "throughput"
    name = "Serving throughput" if higher else f"Serving latency {key}"
    return {
        "measure": f"{name}, Mask R-CNN R18-FPN, {variant}, {level} concurrent clients",
        "unit": "images/s" if higher else "s",
        "ours": ours,
        "baseline": baseline,
        "baseline_name": BASELINE,
        "ratio": ratio,
        "ratio_definition": "ours / baseline" + ("" if higher else " (lower is better)"),
        "goal": f">= {goal:.2f}" if higher else f"<= {goal:.2f}",
        "met": ratio >= goal if higher else ratio <= goal,
        "details": f"median of {repeats} run(s) each; {notes}; ours "
        f"{[round(v, 4) for v in ours_runs]}, baseline {[round(v, 4) for v in baseline_runs]}",
    }


def baseline_server(checkpoint: str, port: int) -> None:
    """The naive server: DetInferencer on each request's image, one request at a time."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import mmcv
    from mmdet.apis import DetInferencer

    from utils.inference.predict import find_export
    from utils.training.export import CONFIG_FILE, MODEL_FILE

    export = find_export(checkpoint)
    inferencer = DetInferencer(
        str(export / CONFIG_FILE), str(export / MODEL_FILE), device="cpu", show_progress=False
    )

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.reply(b'{"status": "ok"}')

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            result = inferencer(mmcv.imfrombytes(body), no_save_vis=True)
            self.reply(json.dumps(result["predictions"][0]).encode())

        def reply(self, data: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:  # quiet, as ours is
            pass

    class Server(HTTPServer):
        request_queue_size = 128  # the clients' connections wait instead of being refused

    with Server(("127.0.0.1", port), Handler) as server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    if sys.argv[1:2] != ["baseline"] or len(sys.argv) != 4:
        sys.exit("usage: python -m bench.serve baseline CHECKPOINT PORT")
    baseline_server(sys.argv[2], int(sys.argv[3]))
