"""Tests of utils.training.weights: a small RetinaNet's checkpoint from a file, a loopback HTTP
server
(standing in for the mmdet model zoo) and the Cloud Storage emulator. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import pickle
import socket
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from mmengine.config import Config
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu

from utils.data import gcs
from utils.training.weights import LoadReport, WeightsError, load_weights, read_state_dict, resolve

CONFIG = "configs/synthetic/retinanet_r18_fpn_synthetic.py"
HEAD = ("bbox_head.retina_cls.weight", "bbox_head.retina_cls.bias")
ZOO = "/mmdetection/v3.0/retinanet/retinanet_r18_fpn_synthetic_20200130"


@pytest.fixture(scope="module")
def cfg() -> Config:
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    return Config.fromfile(CONFIG)


def build(cfg: Config, num_classes: int = 3) -> torch.nn.Module:
    from mmdet.registry import MODELS

    cfg = copy.deepcopy(cfg)
    cfg.model.bbox_head.num_classes = num_classes
    return MODELS.build(cfg.model)


@pytest.fixture(scope="module")
def trained(cfg: Config) -> torch.nn.Module:
    """The model whose weights the checkpoint holds (random, but not a fresh model's)."""
    torch.manual_seed(1)
    return build(cfg)


@pytest.fixture(scope="module")
def checkpoint(
    cfg: Config, trained: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """What mmengine's Runner.save_checkpoint writes: numpy values and HistoryBuffers around."""
    hub = MessageHub.get_instance("test-weights")
    hub.update_scalar("train/loss", np.float64(1.5))
    hub.update_info("eta", np.float64(0.0))
    checkpoint = {
        "meta": {
            "cfg": cfg.pretty_text,
            "model": cfg.model,  # a ConfigDict
            "seed": np.int64(7),
            "epoch": 12,
            "dataset_meta": {"classes": ("a", "b", "c"), "palette": [(1, 2, 3)]},
            "hook_msgs": {"best_score": np.float64(0.5), "history": np.zeros(3, np.float32)},
            "dtype": np.dtype("float16"),
        },
        "state_dict": weights_to_cpu(trained.state_dict()),
        "message_hub": hub.state_dict(),
    }
    path = tmp_path_factory.mktemp("weights") / "epoch_12.pth"
    save_checkpoint(checkpoint, str(path))
    return path


def assert_same(model: torch.nn.Module, trained: torch.nn.Module, skip: tuple = ()) -> None:
    state = model.state_dict()
    for key, value in trained.state_dict().items():
        assert torch.equal(state[key], value) != (key in skip), key


def test_mmengine_checkpoint_loads(checkpoint: Path, trained: torch.nn.Module, cfg: Config) -> None:
    # Why the allow-list: torch's default refuses the metadata.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(checkpoint, weights_only=True)
    # A process-wide allowance (model_def.py makes one) outlives the load's own.
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([np.ndarray, np.dtype])
    try:
        model = build(cfg)
        report = load_weights(model, str(checkpoint))
        assert {np.ndarray, np.dtype} <= set(torch.serialization.get_safe_globals())
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
    total = len(trained.state_dict())
    assert report == LoadReport(checkpoint, loaded=total, skipped_shape=0, missing=0, unexpected=0)
    assert_same(model, trained)


def test_old_format_and_numpy_1_names(
    checkpoint: Path, trained: torch.nn.Module, tmp_path: Path
) -> None:
    """2020 model-zoo files: torch's legacy (non-zip) format, numpy 1.x module names."""
    old = tmp_path / "old.pth"
    torch.save(
        torch.load(checkpoint, weights_only=False), old, _use_new_zipfile_serialization=False
    )
    data = old.read_bytes()
    assert data.count(b"numpy._core.multiarray\n") >= 2
    old.write_bytes(data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    state = read_state_dict(old)
    assert state.keys() == trained.state_dict().keys()


def test_other_num_classes_skips_the_head(
    checkpoint: Path, trained: torch.nn.Module, cfg: Config, caplog: pytest.LogCaptureFixture
) -> None:
    model = build(cfg, num_classes=5)
    fresh = {key: model.state_dict()[key].clone() for key in HEAD}
    with caplog.at_level(logging.INFO, logger="utils.training.weights"):
        report = load_weights(model, str(checkpoint))
    assert (report.loaded, report.skipped_shape) == (len(trained.state_dict()) - 2, 2)
    assert (report.missing, report.unexpected) == (0, 0)
    assert_same(model, trained, skip=HEAD)
    assert all(torch.equal(model.state_dict()[key], fresh[key]) for key in HEAD)
    skipped = [r.getMessage() for r in caplog.records if "load_from: skipped" in r.getMessage()]
    assert skipped == [
        "load_from: skipped bbox_head.retina_cls.weight: shape (27, 64, 3, 3) in the checkpoint, "
        "(45, 64, 3, 3) in the model.",
        "load_from: skipped bbox_head.retina_cls.bias: shape (27,) in the checkpoint, (45,) in "
        "the model.",
    ]


def test_ddp_bare_state_dict_and_partial(
    trained: torch.nn.Module, cfg: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = trained.state_dict()
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    model = build(cfg)
    assert load_weights(model, str(tmp_path / "ddp.pth")).loaded == len(state)
    assert_same(model, trained)

    # A neck-less file with a stray key: missing and unexpected keys are counted and named.
    partial = {k: v for k, v in state.items() if not k.startswith("neck.")}
    partial["extra"] = state[HEAD[1]]
    torch.save({"state_dict": partial}, tmp_path / "partial.pth")
    necks = sum(k.startswith("neck.") for k in state)
    report = load_weights(build(cfg), str(tmp_path / "partial.pth"))
    assert (report.loaded, report.missing, report.unexpected) == (len(state) - necks, necks, 1)
    assert f"{necks} keys missing from" in caplog.text and "['extra']" in caplog.text


class Reduce:
    """Pickles as a call of `func(*args)`."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def test_not_checkpoints(tmp_path: Path) -> None:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("weights/readme.txt", "not a tensor")
    marker = tmp_path / "pwned"
    files = {
        "garbage.pth": (b"\x8b\x1f garbage " * 50, "not a PyTorch checkpoint"),
        "empty.pth": (b"", "is empty"),
        "plain-zip.pth": (archive.getvalue(), "not a PyTorch checkpoint"),
        "pickled-list.pkl": (pickle.dumps([1, 2, 3]), "not a PyTorch checkpoint"),
        "saved-list.pth": ([1, 2, 3], "holds no weights: .* in a list"),
        "meta-only.pth": ({"meta": {"epoch": 1}}, r"holds no weights: .* in keys \['meta'\]"),
        "posix-path.pth": ({"work_dir": Path("/x")}, "holds pathlib.PosixPath, which is not"),
        "evil.pth": ({"x": Reduce(os.mkdir, str(marker))}, "holds posix.mkdir"),
        "evil-getattr.pth": (
            {"x": Reduce(getattr, HistoryBuffer, "__init__")},
            "not a PyTorch checkpoint .*getattr.*is not allowed",
        ),
    }
    for name, (content, message) in files.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        with pytest.raises(WeightsError, match=f"{path}.*{message}"):
            read_state_dict(path)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="no-such.pth"):
        resolve(str(tmp_path / "no-such.pth"))
    with pytest.raises(WeightsError, match="init_cfg"):
        resolve("torchvision://resnet50")


class FileServer(ThreadingHTTPServer):
    """Serves `files[path]`, counting the requests per path; 404 for other paths."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FileHandler)
        self.files: dict[str, bytes] = {}
        self.requests: Counter[str] = Counter()
        self.delay = 0.0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class FileHandler(BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests[self.path] += 1
        time.sleep(self.server.delay)
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[FileServer]:
    server = FileServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_url_downloads_once_and_verifies(
    server: FileServer, checkpoint: Path, trained: torch.nn.Module, cfg: Config, tmp_path: Path
) -> None:
    data = checkpoint.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    good, bad = f"{ZOO}-{sha[:8]}.pth", f"{ZOO}-{sha[:7]}{'0' if sha[7] != '0' else '1'}.pth"
    server.files = {good: data, bad: data}
    host = f"127.0.0.1_{server.server_address[1]}"

    first = load_weights(build(cfg), server.url(good), cache_dir=tmp_path)
    assert first.path == tmp_path / host / good.lstrip("/")
    assert first.path.read_bytes() == data and first.loaded == len(trained.state_dict())
    model = build(cfg)
    assert load_weights(model, server.url(good), cache_dir=tmp_path) == first
    assert server.requests[good] == 1
    assert_same(model, trained)

    with pytest.raises(WeightsError, match=f"{server.url(bad)}: sha256 {sha} does not start"):
        resolve(server.url(bad), tmp_path)
    leftovers = [p for p in (tmp_path / host).rglob("*") if p.is_file() and p != first.path]
    assert leftovers == []

    with pytest.raises(WeightsError, match=f"cannot download {server.url('/nope.pth')}: HTTP 404"):
        resolve(server.url("/nope.pth"), tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/x.pth"
    with pytest.raises(WeightsError, match=f"cannot download {closed}: .*refused"):
        resolve(closed, tmp_path)


def test_concurrent_downloads_share_one(
    server: FileServer, checkpoint: Path, tmp_path: Path
) -> None:
    """Like the ranks of a host: each opens the lock file itself, so flock serialises them."""
    path = f"{ZOO}.pth"  # no hash in the name: nothing to verify
    server.files = {path: checkpoint.read_bytes()}
    server.delay = 0.3  # the others surely wait while the first downloads
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: resolve(server.url(path), tmp_path), range(3)))
    assert len(set(paths)) == 1 and paths[0].read_bytes() == checkpoint.read_bytes()
    assert server.requests[path] == 1


def test_gcs_object(
    emulator: str,
    checkpoint: Path,
    trained: torch.nn.Module,
    cfg: Config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = storage.Client(
        project="test",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": emulator},
    )
    client.create_bucket("models").blob("retinanet/epoch_12.pth").upload_from_filename(checkpoint)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
    gcs.reset_stats()
    for _ in range(2):
        model = build(cfg)
        report = load_weights(model, "gs://models/retinanet/epoch_12.pth", cache_dir=tmp_path)
        assert report.path == tmp_path / "gs" / "models" / "retinanet" / "epoch_12.pth"
        assert report.loaded == len(trained.state_dict())
        assert_same(model, trained)
    assert gcs.stats().files_downloaded == 1
    for uri, missing in (("gs://models/nope.pth", "object"), ("gs://nope/a.pth", "bucket")):
        with pytest.raises(FileNotFoundError, match=f"load_from='{uri}': no such {missing}"):
            load_weights(build(cfg), uri, cache_dir=tmp_path)
