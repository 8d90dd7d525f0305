"""Shared fixtures: a small generated dataset, cached once per test session."""

from __future__ import annotations

import fcntl
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from tests.servers import emulator, mlflow_server  # noqa: F401  (fixtures, for every module)

REPO = Path(__file__).resolve().parent.parent

# A few images are enough for the plumbing tests; the demo uses the generator's defaults.
TINY_SYNTHETIC = {"num_train": 16, "num_val": 8, "image_size": 128, "max_instances": 3}
# The SGD hyperparameters demo.yaml set before its recipe became AdamW (the config's own): the
# tests that train other configs through demo.yaml keep training them as they did.
SGD_SETS = ("hyperparameters.lr=0.02", "hyperparameters.weight_decay=0.0001")
SGD_SETS += ("hyperparameters.momentum=0.9",)
# Two prediction drawings a validation instead of the default 8, in the runs of the shared helpers
# (a test's own `--set` wins): every validation still draws, but 8 drawings cost a quarter to a
# third of a short run, and only tests/utils/evaluation/test_visualize.py checks what they show.
FEW_DRAWINGS = "hyperparameters.visualization={num_images: 2}"


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic-cache")


@pytest.fixture
def coco(tmp_path: Path, synthetic_cache: Path) -> Path:
    """A writable copy of the tiny generated COCO dataset (3 classes), for tests that damage it."""
    from utils.data.synthetic import SyntheticSpec, ensure_dataset

    source = ensure_dataset(synthetic_cache, SyntheticSpec(**TINY_SYNTHETIC))
    shutil.copytree(source, tmp_path / "coco")
    return tmp_path / "coco"


def disk_data(root: Path, **extra: object) -> dict:
    """The experiment `data` section of a COCO set on disk laid out as the generated one."""
    return {
        "backend": "disk",
        "root": str(root),
        "train_ann": "annotations/instances_train.json",
        "val_ann": "annotations/instances_val.json",
        "train_img_prefix": "train/",
        "val_img_prefix": "val/",
        **extra,
    }


@pytest.fixture
def synthetic_data(synthetic_cache: Path) -> dict:
    """The experiment `data` section of the tiny generated dataset."""
    return {"backend": "synthetic", "cache_dir": str(synthetic_cache), "synthetic": TINY_SYNTHETIC}


def train(
    output: Path, config: str, data: dict, *extra: str, experiment: str = "demo.yaml"
) -> list[dict]:
    """Train locally through model_def (in this process), 4 images a batch; returns the records
    of `output/metrics.jsonl`."""
    import model_def

    model_def.main(
        [
            str(REPO / "experiments" / experiment),
            "--local",
            "--output",
            str(output),
            "--set",
            f"hyperparameters.config_file={config}",
            "--set",
            "hyperparameters.global_batch_size=4",
            "--set",
            f"data={json.dumps(data)}",
            *(part for value in (*SGD_SETS, FEW_DRAWINGS) for part in ("--set", value)),
            *extra,
        ]
    )
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def trained_maskrcnn(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, synthetic_cache: Path
) -> Path:
    """One tiny Mask R-CNN run (2 batches, validated once), shared by the export and predict
    tests: its output folder (checkpoint in `determined/<uuid>/`, `metrics.jsonl`). Trained once
    a test run: under pytest-xdist the first worker to ask trains it in the run's folder while
    the other waits on the lock, then reads it (no test writes into it)."""
    root = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):
        root = root.parent  # the run's folder, which holds each worker's
    output, done = root / "maskrcnn-run", root / "maskrcnn-run.done"
    with (root / "maskrcnn-run.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            shutil.rmtree(output, ignore_errors=True)  # a worker that died while training it
            data = {"backend": "synthetic", "cache_dir": str(synthetic_cache)}
            data["synthetic"] = TINY_SYNTHETIC
            train(
                output,
                "configs/synthetic/maskrcnn_r18_fpn_synthetic.py",
                data,
                "--max-batches",
                "2",
            )
            done.touch()
    return output


DEFAULT_THREADS = pytest.StashKey[int]()
RAY_INFERENCE = {
    "tests/on_ray/test_serve.py",
    "tests/on_ray/test_batch_predict.py",
    "tests/on_ray/test_ray_cli.py",
}

BENCH_SMOKE = "tests/bench/test_bench.py"


def pytest_configure(config: pytest.Config) -> None:
    """pytest-xdist hands out the groups in the order of pytest_collection_modifyitems below,
    not re-sorted by their number of tests (its default puts the one-test benchmark sections,
    the longest, last: one worker then finished them alone)."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test`: `-n 2 --dist loadgroup`) a module's tests run in one
    worker, so its module-scoped servers start once. The modules that start a Ray cluster run in
    two groups, training and inference, so that at most two clusters run at once (one group
    alone was the suite's longest path). The benchmarks' smoke runs a section per test, each
    apart. The groups with the most slow tests go first and the quick ones last, so that the
    two workers finish together."""
    groups = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        group = module
        if module.startswith("tests/on_ray/"):
            group = "ray-inference" if module in RAY_INFERENCE else "ray-training"
        elif module == BENCH_SMOKE:
            group = item.nodeid  # one subprocess each, no shared server: spread them
        item.add_marker(pytest.mark.xdist_group(group))
        groups[item] = group
    slow = Counter(group for item, group in groups.items() if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[groups[item]])  # stable: collection order otherwise


@pytest.fixture(autouse=True)
def one_thread_per_worker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under pytest-xdist each worker computes on one thread, and so do the processes its tests
    start (OMP_NUM_THREADS=1): the workers share the cores, and torch pools spinning on cores the
    other worker uses waste them (beside one busy core, the benchmark smoke's training section
    took 102 s of CPU with torch's default pool of 2 threads, 58 s with one). The Ray modules
    keep torch's default: they compare this process' predictions with a replica's, computed as
    before."""
    if not hasattr(request.config, "workerinput"):
        return
    import torch

    default = request.config.stash.setdefault(DEFAULT_THREADS, torch.get_num_threads())
    if "/on_ray/" in str(request.path):
        torch.set_num_threads(default)
        return
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
