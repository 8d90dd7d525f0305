"""Shared fixtures: a small generated dataset, cached once per test session."""

from __future__ import annotations

import json
import shutil
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
            *(part for value in SGD_SETS for part in ("--set", value)),
            *extra,
        ]
    )
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def trained_maskrcnn(tmp_path_factory: pytest.TempPathFactory, synthetic_cache: Path) -> Path:
    """One tiny Mask R-CNN run (2 batches, validated once), shared by the export and predict
    tests: its output folder (checkpoint in `determined/<uuid>/`, `metrics.jsonl`)."""
    output = tmp_path_factory.mktemp("maskrcnn-run")
    data = {"backend": "synthetic", "cache_dir": str(synthetic_cache), "synthetic": TINY_SYNTHETIC}
    train(output, "configs/synthetic/maskrcnn_r18_fpn_synthetic.py", data, "--max-batches", "2")
    return output


DEFAULT_THREADS = pytest.StashKey[int]()
RAY_INFERENCE = {
    "tests/on_ray/test_serve.py",
    "tests/on_ray/test_batch_predict.py",
    "tests/on_ray/test_ray_cli.py",
}

BENCH_SMOKE = "tests/bench/test_bench.py"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test`: `-n 2 --dist loadgroup`) a module's tests run in one
    worker, so its module-scoped servers start once. The modules that start a Ray cluster run in
    two groups, training and inference, so that at most two clusters run at once (one group
    alone was the suite's longest path). The benchmarks' smoke runs a section per test, each
    apart."""
    for item in items:
        module = item.nodeid.split("::")[0]
        group = module
        if module.startswith("tests/on_ray/"):
            group = "ray-inference" if module in RAY_INFERENCE else "ray-training"
        elif module == BENCH_SMOKE:
            group = item.nodeid  # one subprocess each, no shared server: spread them
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def one_thread_per_worker(request: pytest.FixtureRequest) -> None:
    """Under pytest-xdist each worker computes on one thread: the workers share the cores, and
    two torch pools spinning on the same cores slow each other. The Ray modules keep torch's
    default: they compare this process' predictions with a replica's, computed as before."""
    if not hasattr(request.config, "workerinput"):
        return
    import torch

    default = request.config.stash.setdefault(DEFAULT_THREADS, torch.get_num_threads())
    torch.set_num_threads(default if "/on_ray/" in str(request.path) else 1)
