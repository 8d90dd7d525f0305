"""A run's plan reads nothing but config files and pickles; `prepare_data` is the one step that
readies the data (generates, fetches, checks, reads the classes), in whichever process builds."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_SYNTHETIC, disk_data
from utils.base.errors import AnnotationError, DataError
from utils.data import prepare, source
from utils.training.plan import plan_run
from utils.training.session import prepare_data

RETINANET = "configs/synthetic/retinanet_r18_fpn_synthetic.py"
TOY = "tests/toy/toy_synthetic.py"


def hparams(config: str = RETINANET, **extra: object) -> dict:
    return {"config_file": config, "global_batch_size": 4, **extra}


def synthetic(cache: Path) -> dict:
    return {"backend": "synthetic", "cache_dir": str(cache), "synthetic": TINY_SYNTHETIC}


def refuse(name: str):
    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"planning called {name}")

    return refused


def test_planning_generates_fetches_and_checks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("check_coco_file", "check_split_paths", "check_voc_folders"):
        monkeypatch.setattr(prepare, name, refuse(name))
    monkeypatch.setattr(prepare.synthetic, "ensure_dataset", refuse("ensure_dataset"))
    cache = tmp_path / "cache"
    plan = plan_run(hparams(), synthetic(cache), world_size=2)
    assert not cache.exists()  # nothing generated
    # ... yet the config points where prepare_data will generate it.
    root = source.synthetic.dataset_root(cache, source.synthetic.SyntheticSpec(**TINY_SYNTHETIC))
    assert plan.cfg.train_dataloader.dataset.data_root == str(root)
    assert plan.cfg.model.bbox_head.num_classes == 3  # the generated classes, known without data
    # Disk data that is not here, and GCS data without a network, plan as well.
    plan_run(hparams(), disk_data(tmp_path / "nowhere"))
    gcs = {"backend": "gcs", "bucket": "b", "prefix": "coco", "cache_dir": str(cache)}
    val = plan_run(hparams(), gcs).cfg.val_dataloader.dataset
    assert val.ann_file == str(cache / "gcs" / "b" / "coco/annotations/instances_val2017.json")
    assert not cache.exists()


def test_a_plan_pickles_and_equals_its_original(tmp_path: Path) -> None:
    plan = plan_run(hparams(lr=0.005), synthetic(tmp_path), world_size=2)
    again = pickle.loads(pickle.dumps(plan))
    assert again == plan and again is not plan
    assert again != plan_run(hparams(lr=0.01), synthetic(tmp_path), world_size=2)


def test_bad_data_fails_in_prepare_naming_the_key_or_file(coco: Path, tmp_path: Path) -> None:
    missing = plan_run(hparams(), disk_data(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"^data.train_ann: annotation file .* does not exist"):
        prepare_data(missing)
    train_file = coco / "annotations" / "instances_train.json"
    train_file.write_text("{not json")
    with pytest.raises(AnnotationError, match=f"^{train_file}: cannot read it as JSON"):
        prepare_data(plan_run(hparams(), disk_data(coco)))


def test_prepare_reads_the_files_classes_into_a_new_plan(tmp_path: Path) -> None:
    categories = [{"id": 7, "name": "dog"}, {"id": 2, "name": "cat"}]
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        ann = {"images": [], "annotations": [], "categories": categories}
        (tmp_path / f"{split}.json").write_text(json.dumps(ann))
    data = disk_data(tmp_path, train_ann="train.json", val_ann="val.json")
    plan = plan_run(hparams(), data)
    assert plan.cfg.model.bbox_head.num_classes == 3  # the config's: the file is not read
    prepared = prepare_data(plan)
    assert prepared.cfg.model.bbox_head.num_classes == 2
    assert prepared.cfg.val_dataloader.dataset.metainfo == {"classes": ("cat", "dog")}
    assert plan.cfg.model.bbox_head.num_classes == 3  # the plan handed in is left alone
    assert prepare_data(prepared) == prepared  # idempotent
    # The hyperparameters' overrides stay on top of what the data sets, as when planning.
    override = {"model.bbox_head.num_classes": 5}
    planned = plan_run(hparams(override_mmdet_config=override), data)
    assert prepare_data(planned).cfg.model.bbox_head.num_classes == 5


def test_a_plan_made_here_builds_in_another_process(tmp_path: Path) -> None:
    """As a Ray worker gets it: unpickled in a fresh process, which never imported mmdet's
    modules nor the config's `custom_imports` (the toy detector); prepare_data brings both."""
    plan = plan_run(hparams(TOY), synthetic(tmp_path / "cache"))
    (tmp_path / "plan.pkl").write_bytes(pickle.dumps(plan))
    script = (
        "import pickle, sys\n"
        "from mmdet.registry import DATASETS, MODELS\n"
        "from utils.training.session import prepare_data\n"
        f"plan = pickle.loads(open({str(tmp_path / 'plan.pkl')!r}, 'rb').read())\n"
        "assert 'tests.toy.detector' not in sys.modules\n"
        "plan = prepare_data(plan)\n"
        "MODELS.build(plan.cfg.model)\n"
        "print(len(DATASETS.build(plan.cfg.train_dataloader.dataset)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == str(TINY_SYNTHETIC["num_train"])
