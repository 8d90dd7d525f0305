"""The context `det experiment create EXPERIMENT .` uploads stays small (.detignore).

Determined caps a context at 95 MB, and the original MMDetection example broke on Kubernetes'
ConfigMap limit; ours must stay under 1 MB whatever runs, data and caches sit in the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from determined.common.context import read_v1_context
from determined.common.v1file_utils import v1File_size

REPO = Path(__file__).resolve().parents[2]
LIMIT = 1024 * 1024
JUNK = {
    ".venv/lib/big.so": 3_000_000,
    "runs/demo/determined/ckpt/state_dict.pth": 3_000_000,
    "data/coco/train2017/000001.jpg": 2_000_000,
    "utils/__pycache__/config.cpython-311.pyc": 200_000,
    ".pytest_cache/v/cache/nodeids": 100_000,
    "weights.pth": 2_000_000,
}


def context_files(root: Path) -> dict[str, int]:
    """What the det CLI would upload: path -> size, built by Determined's own context code."""
    return {f.path: v1File_size(f) for f in read_v1_context(root)}


def test_checkout_with_runs_data_and_caches_uploads_under_1_mb(tmp_path: Path) -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in tracked:
        if (REPO / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tmp_path / name)
    for name, size in JUNK.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(os.urandom(size))

    files = context_files(tmp_path)
    assert sum(files.values()) < LIMIT, sorted(files.items(), key=lambda kv: -kv[1])[:5]
    ignored = (".venv/", "runs/", "data/", "utils/__pycache__/", ".pytest_cache/", "weights.pth")
    assert not [path for path in files if path.startswith(ignored)]
    for needed in ("model_def.py", "utils/config/build.py", "startup-hook.sh", "requirements.lock"):
        assert needed in files
    assert any(path.startswith("configs/") for path in files)
    assert not any(path.startswith("tests/") for path in files)


def test_this_checkout_uploads_under_1_mb() -> None:
    files = context_files(REPO)
    assert 0 < sum(files.values()) < LIMIT
    assert not any(path.startswith((".venv/", ".git/", "runs/")) for path in files)
