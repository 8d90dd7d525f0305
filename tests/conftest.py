"""Shared fixtures: a small generated dataset, cached once per test session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.servers import mlflow_server  # noqa: F401  (a fixture, for every module)

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
