"""startup-hook.sh: fetches missing COCO annotations once, completely, from a loopback server."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
HOOK = REPO / "startup-hook.sh"
VENV_BIN = Path(sys.executable).parent
TRAIN = "annotations/instances_train2017.json"
VAL = "annotations/instances_val2017.json"
ZIP_NAME = "annotations_trainval2017.zip"


def tiny_coco(split: str) -> bytes:
    image = {"id": 1, "file_name": "000000000001.jpg", "width": 64, "height": 48}
    box = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 16, 16], "area": 256}
    return json.dumps(
        {
            "info": {"description": f"tiny {split}"},
            "images": [image],
            "annotations": [{**box, "iscrowd": 0, "segmentation": [[4, 4, 20, 4, 20, 20]]}],
            "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
        }
    ).encode()


MEMBERS = {
    TRAIN: tiny_coco("train2017"),
    VAL: tiny_coco("val2017"),
    "annotations/captions_train2017.json": b'{"annotations": []}',
}


def make_zip(members: dict[str, bytes]) -> bytes:
    # Stored, not deflated, so that flipping a byte yields a CRC error rather than a zlib one.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


@dataclass
class Server:
    """The loopback server: `url(name)` for a file it serves, `hits[path]` requests per path."""

    base: str
    hits: Counter[str]
    sha256: str  # of the good zip
    delay: float = 0.0  # seconds before each response, to make concurrent hooks overlap

    def url(self, name: str = ZIP_NAME) -> str:
        return f"{self.base}/{name}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """Serves the good zip, a truncated one, one with a corrupt member and one lacking VAL.

    `cut.zip` announces the good zip's length but closes the connection halfway through it.
    """
    served = tmp_path / "served"
    served.mkdir()
    good = make_zip(MEMBERS)
    corrupt = bytearray(good)
    corrupt[good.index(b"tiny train2017")] ^= 0xFF
    (served / ZIP_NAME).write_bytes(good)
    (served / "truncated.zip").write_bytes(good[: len(good) // 2])
    (served / "corrupt.zip").write_bytes(bytes(corrupt))
    (served / "partial.zip").write_bytes(make_zip({TRAIN: MEMBERS[TRAIN]}))
    hits: Counter[str] = Counter()
    lock = threading.Lock()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self) -> None:
            with lock:
                hits[self.path] += 1
            time.sleep(state.delay)
            if self.path != "/cut.zip":
                return super().do_GET()
            self.send_response(200)
            self.send_header("Content-Length", str(len(good)))
            self.end_headers()
            self.wfile.write(good[: len(good) // 2])
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass  # keeps pytest's output to the tests' own

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = Server(f"http://127.0.0.1:{httpd.server_port}", hits, hashlib.sha256(good).hexdigest())
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    root.mkdir()
    return root


def hook_env(path: str | None = None, **variables: str) -> dict[str, str]:
    """A clean environment: none of the caller's DATA_ROOT, ANNOTATIONS_* or proxy settings."""
    path = path or f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    return {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), "LC_ALL": "C.UTF-8", **variables}


def run_hook(cwd: Path, hook: Path = HOOK, **variables: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(hook)],
        env=hook_env(**variables),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_untouched(root: Path) -> None:
    """Nothing at the final paths and no temporaries; only the lock file may remain."""
    assert not (root / TRAIN).exists() and not (root / VAL).exists()
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".startup-hook-tmp")]
    assert leftovers == []


def assert_placed(root: Path) -> None:
    assert (root / TRAIN).read_bytes() == MEMBERS[TRAIN]
    assert (root / VAL).read_bytes() == MEMBERS[VAL]


def test_downloads_and_places_both_files(server: Server, data_root: Path, tmp_path: Path) -> None:
    result = run_hook(tmp_path, DATA_ROOT=str(data_root), ANNOTATIONS_URL=server.url())
    assert result.returncode == 0, result.stderr
    assert_placed(data_root)
    # Only the files asked for are unpacked, and no temporaries remain.
    assert sorted(p.name for p in data_root.iterdir()) == [".startup-hook.lock", "annotations"]
    assert sorted(p.name for p in (data_root / "annotations").iterdir()) == [
        "instances_train2017.json",
        "instances_val2017.json",
    ]
    assert server.hits[f"/{ZIP_NAME}"] == 1


def test_second_run_does_not_download(server: Server, data_root: Path, tmp_path: Path) -> None:
    env = {"DATA_ROOT": str(data_root), "ANNOTATIONS_URL": server.url()}
    assert run_hook(tmp_path, **env).returncode == 0
    again = run_hook(tmp_path, **env)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert server.hits[f"/{ZIP_NAME}"] == 1
    assert_placed(data_root)


def test_fetches_only_the_missing_file(server: Server, data_root: Path, tmp_path: Path) -> None:
    (data_root / "annotations").mkdir()
    (data_root / TRAIN).write_bytes(b'{"kept": true}')
    (data_root / VAL).write_bytes(b"")  # an empty file counts as missing
    result = run_hook(tmp_path, DATA_ROOT=str(data_root), ANNOTATIONS_URL=server.url())
    assert result.returncode == 0, result.stderr
    assert (data_root / TRAIN).read_bytes() == b'{"kept": true}'
    assert (data_root / VAL).read_bytes() == MEMBERS[VAL]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("truncated.zip", "truncated or corrupt"),
        ("corrupt.zip", "truncated or corrupt"),
        ("cut.zip", "could not download"),
        ("partial.zip", f"{VAL} is missing or empty in the zip"),
        ("absent.zip", "could not download"),
    ],
)
def test_bad_download_fails_and_leaves_nothing(
    server: Server, data_root: Path, tmp_path: Path, name: str, message: str
) -> None:
    result = run_hook(tmp_path, DATA_ROOT=str(data_root), ANNOTATIONS_URL=server.url(name))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("startup-hook: error: ") and message in last, result.stderr
    assert server.url(name) in last
    assert_untouched(data_root)


def test_checksum_mismatch_names_both_sums(server: Server, data_root: Path, tmp_path: Path) -> None:
    wrong = "0" * 64
    result = run_hook(
        tmp_path, DATA_ROOT=str(data_root), ANNOTATIONS_URL=server.url(), ANNOTATIONS_SHA256=wrong
    )
    assert result.returncode != 0
    assert "checksum mismatch" in result.stderr
    assert wrong in result.stderr and server.sha256 in result.stderr
    assert_untouched(data_root)


def test_correct_checksum_succeeds(server: Server, data_root: Path, tmp_path: Path) -> None:
    result = run_hook(
        tmp_path,
        DATA_ROOT=str(data_root),
        ANNOTATIONS_URL=server.url(),
        ANNOTATIONS_SHA256=server.sha256.upper(),  # as some sites print it
    )
    assert result.returncode == 0, result.stderr
    assert_placed(data_root)


def test_unreachable_url_fails_naming_it(data_root: Path, tmp_path: Path) -> None:
    # A port that was free a moment ago: connections to it are refused at once.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{ZIP_NAME}"
    result = run_hook(tmp_path, DATA_ROOT=str(data_root), ANNOTATIONS_URL=url)
    assert result.returncode != 0
    assert f"could not download {url}" in result.stderr
    assert_untouched(data_root)


def test_concurrent_hooks_download_once(server: Server, data_root: Path, tmp_path: Path) -> None:
    server.delay = 0.5  # the first hook holds the lock while the second starts
    env = hook_env(DATA_ROOT=str(data_root), ANNOTATIONS_URL=server.url())
    hooks = [
        subprocess.Popen(
            ["bash", str(HOOK)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [hook.communicate(timeout=60)[0] for hook in hooks]
    assert [hook.returncode for hook in hooks] == [0, 0], outputs
    assert server.hits[f"/{ZIP_NAME}"] == 1
    assert_placed(data_root)
    assert not [p for p in data_root.iterdir() if p.name.startswith(".startup-hook-tmp")]


def test_python_download_without_curl(server: Server, data_root: Path, tmp_path: Path) -> None:
    # The system's commands, all but curl, so the hook falls back to urllib.
    tools = tmp_path / "no-curl-bin"
    tools.mkdir()
    for folder in (Path("/usr/local/bin"), Path("/usr/bin"), Path("/bin")):
        for tool in folder.glob("*"):
            if tool.name != "curl" and not (tools / tool.name).exists():
                (tools / tool.name).symlink_to(tool)
    path = f"{VENV_BIN}{os.pathsep}{tools}"
    assert shutil.which("curl", path=path) is None
    env = hook_env(path, DATA_ROOT=str(data_root), ANNOTATIONS_URL=server.url())
    ok = subprocess.run(["bash", str(HOOK)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert_placed(data_root)

    other_root = tmp_path / "other"
    other_root.mkdir()
    env.update(DATA_ROOT=str(other_root), ANNOTATIONS_URL=server.url("cut.zip"))
    cut = subprocess.run(["bash", str(HOOK)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert cut.returncode != 0
    assert "connection closed before the end of the file" in cut.stderr
    assert_untouched(other_root)


def test_nothing_to_do_without_data_root_or_cluster_info(tmp_path: Path) -> None:
    if Path("/run/determined/info/cluster.json").exists():
        pytest.skip("running inside a Determined task: its cluster info names a data section")
    result = run_hook(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout


def test_real_cluster_info_exposes_user_data() -> None:
    """The hook reads `det.get_cluster_info().user_data`, which the fake below stands in for."""
    import determined as det

    assert isinstance(det.ClusterInfo.user_data, property)


@pytest.fixture
def fake_determined(tmp_path: Path) -> Path:
    """A `determined` module whose cluster info has the data section in $FAKE_DET_DATA."""
    package = tmp_path / "fake-det" / "determined"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import json, os\n\n\n"
        "class _Info:\n"
        "    user_data = json.loads(os.environ['FAKE_DET_DATA'])\n\n\n"
        "def get_cluster_info():\n"
        "    return _Info()\n"
    )
    return package.parent


def test_data_root_from_cluster_info(
    server: Server, data_root: Path, tmp_path: Path, fake_determined: Path
) -> None:
    data = json.dumps({"backend": "disk", "root": str(data_root)})
    result = run_hook(
        tmp_path, PYTHONPATH=str(fake_determined), FAKE_DET_DATA=data, ANNOTATIONS_URL=server.url()
    )
    assert result.returncode == 0, result.stderr
    assert_placed(data_root)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"backend": "synthetic", "root": "/nowhere"}, "data.backend is synthetic, not disk"),
        ({"backend": "disk"}, "no data.root"),
        ({}, "no data.root"),  # tasks other than trials have no data section
    ],
)
def test_nothing_to_do_for_other_data_sections(
    server: Server, tmp_path: Path, fake_determined: Path, data: dict, message: str
) -> None:
    result = run_hook(
        tmp_path,
        PYTHONPATH=str(fake_determined),
        FAKE_DET_DATA=json.dumps(data),
        ANNOTATIONS_URL=server.url(),
    )
    assert result.returncode == 0, result.stderr
    assert message in result.stdout and "nothing to do" in result.stdout
    assert sum(server.hits.values()) == 0


def test_missing_data_root_fails(tmp_path: Path) -> None:
    result = run_hook(tmp_path, DATA_ROOT=str(tmp_path / "not-mounted"))
    assert result.returncode != 0
    assert "does not exist" in result.stderr and "bind_mounts" in result.stderr


def test_read_only_data_root_fails_clearly(server: Server) -> None:
    # root passes permission checks on a writable filesystem, so as root the hook runs as nobody;
    # the folders live outside pytest's tmp_path, which only its owner may enter.
    command = ["bash"]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv to drop privileges; chmod has no effect")
        command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "bash"]
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        base.chmod(0o755)
        hook = base / HOOK.name
        shutil.copy(HOOK, hook)
        hook.chmod(0o644)
        root = base / "coco"
        (root / "annotations").mkdir(parents=True)
        (root / VAL).write_bytes(MEMBERS[VAL])
        root.chmod(0o555)
        (root / "annotations").chmod(0o555)
        env = hook_env(DATA_ROOT=str(root), ANNOTATIONS_URL=server.url(), HOME=str(base))
        result = subprocess.run(
            [*command, str(hook)], env=env, cwd=base, capture_output=True, text=True, timeout=60
        )
        root.chmod(0o755)  # lets TemporaryDirectory clean up
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"startup-hook: error: data root {root} is read-only"), result.stderr
    assert TRAIN in last and "mount it writable" in last
    assert sum(server.hits.values()) == 0


def test_read_only_data_root_with_files_is_fine(tmp_path: Path, data_root: Path) -> None:
    (data_root / "annotations").mkdir()
    for name in (TRAIN, VAL):
        (data_root / name).write_bytes(MEMBERS[name])
    data_root.chmod(0o555)
    result = run_hook(tmp_path, DATA_ROOT=str(data_root), ANNOTATIONS_URL="http://127.0.0.1:9/x")
    data_root.chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert not (data_root / ".startup-hook.lock").exists()  # no lock needed to find nothing to do


# Determined's trial entrypoint sources the hook under `set -e` and `set -x`, then goes on.
ENTRYPOINT = (
    'set -e; STARTUP_HOOK="startup-hook.sh"; set -x; '
    'test -f "${STARTUP_HOOK}" && source "${STARTUP_HOOK}"; set +x; '
    'echo "entrypoint continues with options $-"'
)


def test_sourced_by_the_entrypoint(server: Server, data_root: Path, tmp_path: Path) -> None:
    shutil.copy(HOOK, tmp_path / "startup-hook.sh")
    env = hook_env(DATA_ROOT=str(data_root), ANNOTATIONS_URL=server.url())
    run = ["bash", "-c", ENTRYPOINT]
    for _ in range(2):  # downloads, then has nothing to do: both `exit 0` paths of the hook
        result = subprocess.run(run, env=env, cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        options = result.stdout.split("entrypoint continues with options ")[1].strip()
        assert "u" not in options  # the hook's `set -u` did not leak into the entrypoint
    assert_placed(data_root)

    env.update(DATA_ROOT=str(tmp_path / "missing"))
    failed = subprocess.run(run, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert failed.returncode != 0
    assert "entrypoint continues" not in failed.stdout
    assert "startup-hook: error: data root" in failed.stderr


def test_shellcheck_passes() -> None:
    shellcheck = VENV_BIN / "shellcheck"
    assert shellcheck.is_file(), f"{shellcheck} is missing; `make setup` installs it"
    result = subprocess.run(
        [str(shellcheck), str(HOOK)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
