"""Tests of the Cloud Storage backend against gcp-storage-emulator, through a fault-injecting proxy.

Everything listens on 127.0.0.1: the emulator (once per module) and, per test, a threaded HTTP
proxy that counts requests per object and can answer an error or reset the connection instead.
"""

from __future__ import annotations

import http.client
import importlib
import json
import multiprocessing
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import cv2
import mmcv
import numpy as np
import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from mmcv.transforms import LoadImageFromFile
from mmengine import fileio
from mmengine.fileio.backends import backends, prefix_to_backends
from torch.utils.data import DataLoader, Dataset

import utils.data
from tests.conftest import train
from utils.data import gcs
from utils.data.synthetic import CLASSES, MARKER, SyntheticSpec, ensure_dataset

BUCKET = "test-bucket"
PREFIX = "coco"
# Fast retries and short timeouts, so a broken test fails in seconds.
FAST = {"backend": "gcs", "base_delay": 0.01, "timeout": 5.0}
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}


class FaultProxy(ThreadingHTTPServer):
    """Forwards to the emulator; `faults["bucket/object"]` lists what the next requests get.

    An action is an HTTP status to answer instead (with a GCS-style JSON error) or "reset" (drop
    the connection with a TCP RST); with the list used up, requests pass through.
    """

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.upstream = urlsplit(upstream).netloc
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.faults: dict[str, list[int | str]] = {}
        self.media_delay = 0.0  # seconds before forwarding a download, to widen races
        self.requests: Counter[str] = Counter()  # all requests naming the object
        self.served: Counter[str] = Counter()  # successful downloads of the object
        self.lock = threading.Lock()


class ProxyHandler(BaseHTTPRequestHandler):
    server: FaultProxy

    def log_message(self, format: str, *args: object) -> None:
        pass

    def forward(self) -> None:
        proxy = self.server
        path = urlsplit(self.path).path
        key = None
        if "/b/" in path and "/o/" in path:
            bucket, name = path.split("/b/", 1)[1].split("/o/", 1)
            key = f"{bucket}/{unquote(name)}"
        media = "alt=media" in self.path
        with proxy.lock:
            if key:
                proxy.requests[key] += 1
            actions = proxy.faults.get(key, [])
            action = actions.pop(0) if actions else None
        if action == "reset":
            # Linger 0: closing sends RST, the client sees "connection reset by peer".
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if isinstance(action, int):
            body = json.dumps({"error": {"code": action, "message": f"injected {action}"}})
            self.reply(action, [("Content-Type", "application/json")], body.encode())
            return
        if media and proxy.media_delay:
            time.sleep(proxy.media_delay)
        length = int(self.headers.get("Content-Length") or 0)
        upstream = http.client.HTTPConnection(proxy.upstream, timeout=10)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            upstream.request(self.command, self.path, self.rfile.read(length), headers)
            response = upstream.getresponse()
            status, headers, data = response.status, response.getheaders(), response.read()
        finally:
            upstream.close()
        if key and media and status == 200:
            with proxy.lock:
                proxy.served[key] += 1
        self.reply(status, headers, data)

    def reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in HOP_HEADERS:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward


@pytest.fixture(scope="module", autouse=True)
def gcs_backend() -> None:
    """mmengine's fileio reads gs:// paths through the backend, once registered."""
    gcs.register_gcs_backend()


@pytest.fixture(scope="module")
def local(emulator: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated COCO dataset, uploaded to gs://BUCKET/PREFIX/; returns its local root."""
    root = ensure_dataset(tmp_path_factory.mktemp("gcs"), SyntheticSpec(num_train=8, num_val=4))
    client = storage.Client(
        project="test",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": emulator},
    )
    bucket = client.create_bucket(BUCKET)
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MARKER:
            bucket.blob(f"{PREFIX}/{path.relative_to(root)}").upload_from_filename(path)
    return root


@pytest.fixture
def proxy(emulator: str, local: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    server = FaultProxy(emulator)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
    gcs.reset_stats()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _images(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.glob("*/*.png"))


def test_importing_does_not_register_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh import of utils.data.gcs only defines the backend; `register_gcs_backend`
    registers it (again without failing). The registry and the modules are restored afterwards."""
    monkeypatch.delitem(backends, "gcs")
    monkeypatch.delitem(prefix_to_backends, "gs")
    for name in ("gcs", "gcs_client"):
        monkeypatch.delitem(sys.modules, f"utils.data.{name}")
        monkeypatch.delattr(utils.data, name)
    fresh = importlib.import_module("utils.data.gcs")
    assert fresh is not gcs
    assert "gcs" not in backends and "gs" not in prefix_to_backends
    fresh.register_gcs_backend()
    fresh.register_gcs_backend()
    assert backends["gcs"] is prefix_to_backends["gs"] is fresh.GCSBackend
    assert isinstance(fileio.get_file_backend("gs://bucket/object"), fresh.GCSBackend)


def test_fileio_reads_every_image(proxy: FaultProxy, local: Path) -> None:
    images = _images(local)
    assert len(images) == 12
    for rel in images:
        uri = f"gs://{BUCKET}/{PREFIX}/{rel}"
        data = fileio.get(uri, backend_args={"backend": "gcs"})
        assert data == (local / rel).read_bytes()
        assert np.array_equal(mmcv.imfrombytes(data), cv2.imread(str(local / rel)))
    # The `gs` prefix selects the backend without backend_args too.
    assert fileio.get(f"gs://{BUCKET}/{PREFIX}/{images[0]}") == (local / images[0]).read_bytes()
    assert (gcs.stats().objects_read, gcs.stats().retries) == (13, 0)


def test_load_image_from_file(proxy: FaultProxy, local: Path) -> None:
    from mmdet.registry import TRANSFORMS
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    transforms = [
        LoadImageFromFile(backend_args={"backend": "gcs"}),
        TRANSFORMS.build({"type": "LoadImageFromFile", "backend_args": {"backend": "gcs"}}),
    ]
    for rel in _images(local):
        for transform in transforms:
            results = transform({"img_path": f"gs://{BUCKET}/{PREFIX}/{rel}"})
            assert np.array_equal(results["img"], cv2.imread(str(local / rel)))
            assert results["ori_shape"] == (128, 128)


def test_coco_dataset_from_bucket(proxy: FaultProxy, local: Path, tmp_path: Path) -> None:
    """data_root on gs://: the annotation file goes to the local cache, images stay remote."""
    from mmdet.datasets import CocoDataset

    dataset = CocoDataset(
        data_root=f"gs://{BUCKET}/{PREFIX}/",
        ann_file="annotations/instances_train.json",
        data_prefix={"img": "train/"},
        metainfo={"classes": CLASSES},
        pipeline=[LoadImageFromFile(backend_args={"backend": "gcs"})],
        backend_args={"backend": "gcs", "cache_dir": str(tmp_path)},
    )
    assert len(dataset) == 8
    ann = local / "annotations" / "instances_train.json"
    assert (tmp_path / BUCKET / PREFIX / "annotations" / ann.name).read_bytes() == ann.read_bytes()
    for index in range(len(dataset)):
        sample = dataset[index]
        rel = sample["img_path"].removeprefix(f"gs://{BUCKET}/{PREFIX}/")
        assert np.array_equal(sample["img"], cv2.imread(str(local / rel)))
    assert gcs.stats().objects_read == 8


class ImageBytes(Dataset):
    """What a data-loader worker sees: the image, and whether it reuses the parent's client."""

    parent_client: storage.Client | None = None

    def __init__(self, uris: list[str]) -> None:
        self.uris = uris

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, index: int) -> tuple[bytes, bool, int]:
        data = fileio.get(self.uris[index], backend_args=FAST)
        shared = gcs.get_client() is ImageBytes.parent_client
        return data, shared, gcs.stats().objects_read


def test_forked_workers_make_their_own_client(proxy: FaultProxy, local: Path) -> None:
    images = _images(local)
    uris = [f"gs://{BUCKET}/{PREFIX}/{rel}" for rel in images]
    fileio.get(uris[0], backend_args=FAST)  # the parent has a client before the fork
    ImageBytes.parent_client = gcs.get_client()
    loader = DataLoader(
        ImageBytes(uris), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    results = list(loader)
    assert [data for data, _, _ in results] == [(local / rel).read_bytes() for rel in images]
    assert not any(shared for _, shared, _ in results)
    # Each worker counts its own reads: 6 each, not continuing from the parent's 1.
    assert max(count for _, _, count in results) == len(images) // 2
    assert gcs.stats().objects_read == 1


def test_spawned_workers_register_the_backend(proxy: FaultProxy, local: Path) -> None:
    """A worker started by spawn inherits no registration: `register_gcs_backend` as the loader's
    `worker_init_fn` registers it there."""
    images = _images(local)[:2]
    loader = DataLoader(
        ImageBytes([f"gs://{BUCKET}/{PREFIX}/{rel}" for rel in images]),
        batch_size=None,
        num_workers=1,
        multiprocessing_context="spawn",
        worker_init_fn=gcs.register_gcs_backend,
    )
    assert [data for data, _, _ in loader] == [(local / rel).read_bytes() for rel in images]


def test_download_annotations_once(proxy: FaultProxy, local: Path, tmp_path: Path) -> None:
    names = [f"{PREFIX}/annotations/instances_{s}.json" for s in ("train", "val")]
    paths = gcs.download_annotations(BUCKET, names, tmp_path)
    expected = [local / "annotations" / f"instances_{s}.json" for s in ("train", "val")]
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in expected]
    mtimes = [p.stat().st_mtime_ns for p in paths]

    assert gcs.download_annotations(BUCKET, names, tmp_path) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    assert [proxy.served[f"{BUCKET}/{n}"] for n in names] == [1, 1]
    assert gcs.stats().files_downloaded == 2

    paths[0].write_bytes(b"{}")  # an incomplete or stale copy is replaced
    gcs.download_annotations(BUCKET, names, tmp_path)
    assert paths[0].read_bytes() == expected[0].read_bytes()
    assert [proxy.served[f"{BUCKET}/{n}"] for n in names] == [2, 1]
    assert not [p for p in paths[0].parent.iterdir() if p.name.startswith(".")]


def test_download_annotations_concurrent(proxy: FaultProxy, local: Path, tmp_path: Path) -> None:
    name = f"{PREFIX}/annotations/instances_train.json"
    proxy.media_delay = 0.5  # both processes are surely waiting while the first downloads
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=gcs.download_annotations, args=(BUCKET, [name], tmp_path))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0]
    expected = (local / "annotations" / "instances_train.json").read_bytes()
    assert (tmp_path / BUCKET / name).read_bytes() == expected
    assert proxy.served[f"{BUCKET}/{name}"] == 1
    assert proxy.requests[f"{BUCKET}/{name}"] == 3  # metadata twice, media once


def test_transient_errors_are_retried(proxy: FaultProxy, local: Path) -> None:
    images = _images(local)
    faults: dict[str, list[int | str]] = {
        images[0]: [503, 503],
        images[1]: [503, 503, 503],
        images[2]: ["reset"],
        images[3]: [429, 500, 502, 504],
    }
    for rel, actions in faults.items():
        proxy.faults[f"{BUCKET}/{PREFIX}/{rel}"] = list(actions)
    for rel in images:
        data = fileio.get(f"gs://{BUCKET}/{PREFIX}/{rel}", backend_args=FAST)
        assert data == (local / rel).read_bytes()
    assert gcs.stats().retries == sum(len(a) for a in faults.values()) == 10
    assert gcs.stats().objects_read == len(images)
    assert all(proxy.served[f"{BUCKET}/{PREFIX}/{rel}"] == 1 for rel in images)
    assert proxy.requests[f"{BUCKET}/{PREFIX}/{images[1]}"] == 4


def test_retries_are_bounded(proxy: FaultProxy) -> None:
    key = f"{BUCKET}/{PREFIX}/train/000000.png"
    proxy.faults[key] = [503] * 10
    with pytest.raises(gcs.GCSError, match=f"gs://{key}: still failing after 3 attempts"):
        fileio.get(f"gs://{key}", backend_args={**FAST, "max_attempts": 3})
    assert proxy.requests[key] == 3


@pytest.mark.parametrize(
    ("bucket", "fault", "error", "message"),
    [
        (BUCKET, None, gcs.GCSNotFoundError, f"gs://{BUCKET}/{PREFIX}/train/nope.png not found"),
        ("no-such-bucket", None, gcs.GCSBucketNotFoundError, "bucket no-such-bucket does not"),
        (BUCKET, 403, gcs.GCSPermissionError, f"cannot read bucket {BUCKET}"),
        (BUCKET, 401, gcs.GCSPermissionError, "bad or missing Google Cloud credentials"),
    ],
)
def test_permanent_errors_fail_at_once(
    proxy: FaultProxy, bucket: str, fault: int | None, error: type, message: str
) -> None:
    key = f"{bucket}/{PREFIX}/train/{'000000' if fault else 'nope'}.png"
    if fault:
        proxy.faults[key] = [fault] * 5
    started = time.monotonic()
    with pytest.raises(error, match=message):
        fileio.get(f"gs://{key}", backend_args=FAST)
    assert time.monotonic() - started < 2
    assert proxy.requests[key] == 1
    assert gcs.stats().retries == 0


def test_memory_cache_is_lru(proxy: FaultProxy, local: Path) -> None:
    images = [f"gs://{BUCKET}/{PREFIX}/{rel}" for rel in _images(local)[:3]]
    sizes = [len((local / rel).read_bytes()) for rel in _images(local)[:3]]
    backend = gcs.GCSBackend(cache_bytes=sizes[0] + sizes[1])
    for uri in (images[0], images[1], images[0], images[2], images[1]):
        backend.get(uri)
    served = [proxy.served[uri.removeprefix("gs://")] for uri in images]
    assert served == [1, 2, 1]  # images[1] was the least recently used when images[2] came
    assert gcs.stats().cache_hits == 1


def test_local_paths_and_join(tmp_path: Path) -> None:
    backend = gcs.GCSBackend()
    (tmp_path / "a.json").write_text('{"x": 1}')
    assert backend.get_text(tmp_path / "a.json") == '{"x": 1}'
    with backend.get_local_path(str(tmp_path / "a.json")) as path:
        assert path == str(tmp_path / "a.json")
    assert backend.join_path("gs://b/p/", "train/") == "gs://b/p/train/"
    assert fileio.join_path("gs://b/p", "train", "x.png") == "gs://b/p/train/x.png"
    with pytest.raises(ValueError, match="gs://bucket/object"):
        gcs.split_path("gs://only-bucket")


def test_missing_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(gcs.GCSPermissionError, match="no Google Cloud credentials"):
        fileio.get("gs://some-bucket/a.png", backend_args=FAST)


def test_training_from_the_bucket_matches_disk(
    proxy: FaultProxy, local: Path, tmp_path: Path
) -> None:
    """A short training and validation read through GCS (with injected faults) equals disk."""
    layout = {
        "train_ann": "annotations/instances_train.json",
        "val_ann": "annotations/instances_val.json",
        "train_img_prefix": "train/",
        "val_img_prefix": "val/",
    }
    sources = {
        "disk": {"backend": "disk", "root": str(local), **layout},
        "gcs": {"backend": "gcs", "bucket": BUCKET, "prefix": PREFIX, **layout},
    }
    images = _images(local)
    faults = {images[0]: [503, 503], images[5]: ["reset"], images[-1]: [503]}
    for rel, actions in faults.items():
        proxy.faults[f"{BUCKET}/{PREFIX}/{rel}"] = list(actions)
    records = {}
    for name, data in sources.items():
        run = train(
            tmp_path / name,
            "configs/synthetic/retinanet_r18_fpn_synthetic.py",
            {**data, "cache_dir": str(tmp_path / "cache")},
            "--max-batches",
            "2",
            "--report-every",
            "1",
            "--set",
            # In-process loading, so this process's counters see every read.
            "hyperparameters.override_mmdet_config="
            "{train_dataloader.num_workers: 0, val_dataloader.num_workers: 0}",
            "--set",
            # The prediction images read their images again; only the data path is counted here.
            "hyperparameters.visualization.num_images=0",
            "--set",
            # So does the start-up sanity pass (2 training and 2 validation images, once more).
            "hyperparameters.sanity_pass=false",
        )
        records[name] = [(r["kind"], r["batches"], r["metrics"]) for r in run]
    assert records["gcs"] == records["disk"]
    assert [kind for kind, _, _ in records["gcs"]] == ["training", "training", "validation"]
    # 2 batches of 4 training images and the 4 validation images, each read once, despite faults.
    assert gcs.stats().objects_read == 12
    assert gcs.stats().retries == 4
    served = [proxy.served[f"{BUCKET}/{PREFIX}/{rel}"] for rel in images]
    assert sum(served) == 12 and max(served) == 1
