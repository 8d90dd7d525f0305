"""The annotation checks' host cache: a file is checked once per content, the ranks of a host
wait for the one that checks, and any change to the bytes is checked again."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from utils.base.errors import AnnotationError
from utils.data import annotations
from utils.data.annotations import check_coco_file


def coco(images: int, width: int = 64) -> dict:
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "width": width, "height": 64}
                   for i in range(images)],
        "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [70, 2, 10, 10],
                         "area": 100, "iscrowd": 0} for i in range(images)],
        "categories": [{"id": 1, "name": "thing"}],
    }  # fmt: skip


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "checks"
    monkeypatch.setattr(annotations, "CHECKS_DIR", folder)
    return folder


def test_same_content_is_checked_once(tmp_path: Path, cache: Path) -> None:
    first = tmp_path / "a.json"
    first.write_text(json.dumps(coco(3)))
    report = check_coco_file(first)
    assert not report.from_cache and len(list(cache.glob("*.json"))) == 1
    # Boxes outside their 64 px images: skipped, and still reported from the cache.
    assert report.skipped == [0, 1, 2]
    copy = tmp_path / "b.json"
    copy.write_bytes(first.read_bytes())
    again = check_coco_file(copy)
    assert again.from_cache and again.path == copy
    assert (again.categories, again.images, again.skipped) == (["thing"], 3, [0, 1, 2])


def test_changed_bytes_are_checked_again(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps(coco(2, width=99)))  # boxes inside
    assert check_coco_file(path).skipped == []
    data = coco(2, width=64)  # same size on disk, boxes now outside
    path.write_text(json.dumps(data))
    assert check_coco_file(path).skipped == [0, 1]
    data["annotations"][0]["image_id"] = 7
    path.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"a.json: annotation 0 names image_id 7"):
        check_coco_file(path)


def test_an_error_is_kept_and_names_each_file(tmp_path: Path, cache: Path) -> None:
    data = coco(1)
    data["categories"] = []
    for name in ("one.json", "two.json"):
        (tmp_path / name).write_text(json.dumps(data))
        with pytest.raises(AnnotationError, match=rf"{name}: 'categories' is empty"):
            check_coco_file(tmp_path / name)
    assert len(list(cache.glob("*.json"))) == 1


def test_an_unwritable_cache_still_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(annotations, "CHECKS_DIR", blocker / "checks")  # under a file: no mkdir
    path = tmp_path / "a.json"
    path.write_text(json.dumps(coco(2)))
    report = check_coco_file(path)
    assert report.skipped == [0, 1] and not report.from_cache


def _check_in_process(path: str, folder: str) -> bool:
    annotations.CHECKS_DIR = Path(folder)
    return check_coco_file(Path(path)).from_cache


def test_ranks_of_a_host_check_once(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(coco(20_000)))  # big enough that the ranks overlap
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        cached = pool.starmap(_check_in_process, [(str(path), str(cache))] * 4)
    assert sorted(cached) == [False, True, True, True]
