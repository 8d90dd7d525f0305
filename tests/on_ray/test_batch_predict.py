"""`python -m on_ray predict ... --workers N` (Ray Data) on a real local Ray, started once for the
module: the same detections and metrics as the single-process `predict`/`evaluate`, bad files
listed while the rest are predicted, images read from the Cloud Storage emulator, a rerun that
skips what an interrupted run finished, and the one-line errors before any worker starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.conftest import REPO, TINY_SYNTHETIC
from tests.servers import free_port

ray = pytest.importorskip("ray")
from on_ray.cli import main  # noqa: E402

pytestmark = pytest.mark.slow
IMAGES = 4  # of the generated validation split, in batches of 2


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Mask R-CNN R18 export with seeded initial weights (no training: seconds); up to 20
    detections with masks per image, so each test predicts the whole way, masks included."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    from utils.data.synthetic import CLASSES
    from utils.training.export import write_export

    register_all_modules()
    cfg = Config.fromfile(REPO / "configs/synthetic/maskrcnn_r18_fpn_synthetic.py")
    cfg.model.test_cfg.rcnn.max_per_img = 20
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    palette = [(220, 20, 60), (0, 128, 0), (0, 0, 255)]
    folder = tmp_path_factory.mktemp("export")
    return write_export(folder, model.state_dict(), cfg, {"classes": CLASSES, "palette": palette})


@pytest.fixture(scope="module")
def split(synthetic_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An annotation file of the first IMAGES validation images, and their folder."""
    from utils.data.synthetic import SyntheticSpec, ensure_dataset

    root = ensure_dataset(synthetic_cache, SyntheticSpec(**TINY_SYNTHETIC))
    coco = json.loads((root / "annotations" / "instances_val.json").read_text())
    coco["images"] = coco["images"][:IMAGES]
    ids = {image["id"] for image in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
    ann_file = tmp_path_factory.mktemp("split") / "val4.json"
    ann_file.write_text(json.dumps(coco))
    return ann_file, root / "val"


def predict(*args: object, mlflow: bool = False) -> dict:
    return main(["predict", *map(str, args), *([] if mlflow else ["--no-mlflow"])])


@pytest.fixture(scope="module")
def first(
    local_ray: None,
    export: Path,
    split: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict]:
    """The split predicted and evaluated by 2 workers: its output folder and summary."""
    ann_file, images = split
    out = tmp_path_factory.mktemp("ray-data") / "out"
    summary = predict(export, images, "--annotations", ann_file, "--workers", 2,
                      "--batch-size", 2, "--draw", 3, "--output", out)  # fmt: skip
    return out, summary


def by_image(out: Path, task: str) -> dict[int, list[dict]]:
    found: dict[int, list[dict]] = {}
    for result in json.loads((out / f"results.{task}.json").read_text()):
        found.setdefault(result["image_id"], []).append(result)
    return found


def assert_same_results(got: Path, expected: Path) -> None:
    """The same COCO results per image: each expected one matched once by category, mask, box
    and score within 1e-4 (the processes' sums may differ in the last bits)."""
    for task in ("bbox", "segm"):
        ours, theirs = by_image(got, task), by_image(expected, task)
        assert sorted(ours) == sorted(theirs), task
        assert sum(map(len, theirs.values())) > 0, task
        for image_id, wanted in theirs.items():
            left = list(ours[image_id])
            assert len(left) == len(wanted), (task, image_id)
            for want in wanted:
                match = next(
                    (r for r in left
                     if r["category_id"] == want["category_id"]
                     and r.get("segmentation") == want.get("segmentation")
                     and np.allclose(r.get("bbox", 0), want.get("bbox", 0), atol=1e-4)
                     and abs(r["score"] - want["score"]) < 1e-4),
                    None,
                )  # fmt: skip
                assert match is not None, f"{task} {image_id}: {want} not predicted"
                left.remove(match)


def test_two_workers_equal_single_process_evaluate(
    first: tuple[Path, dict], export: Path, split: tuple[Path, Path], tmp_path: Path
) -> None:
    """Ray Data's results, table and report are evaluate's (which predicts as predict does)."""
    from utils.inference.evaluate import evaluate

    ann_file, images = split
    out, summary = first
    expected = evaluate(export, ann_file, tmp_path, str(images), batch_size=2, device="cpu")
    assert_same_results(out, tmp_path)
    assert summary["images"] == expected["images"] == IMAGES
    assert summary["skipped"] == []
    assert summary["metrics"].keys() == expected["metrics"].keys()
    for name, value in expected["metrics"].items():
        assert summary["metrics"][name] == pytest.approx(value, abs=1e-4), name
    assert expected["metrics"]["bbox_AR_100"] > 0  # not an all-zero table
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metrics"] == summary["metrics"] and metrics["images"] == IMAGES
    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert report.keys() == json.loads((tmp_path / "evaluation" / "report.json").read_text()).keys()
    index = json.loads((out / "images.json").read_text())
    coco = json.loads(ann_file.read_text())["images"]
    assert index["images"] == [
        {"id": i["id"], "file_name": str((images / i["file_name"]).resolve())} for i in coco
    ]
    drawn = [f"{i['id']}_{Path(i['file_name']).stem}.png" for i in coco[:3]]  # --draw 3
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(drawn)


def test_a_rerun_skips_what_an_interrupted_run_finished(
    first: tuple[Path, dict],
    export: Path,
    split: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run stopped after a batch of 2 images and in the middle of writing the next record
    (its records file left so) predicts the other 2 on the rerun (batched as in the first run:
    a batch's rounding is its own), and ends as the whole run did. Once all are done, a rerun
    starts no worker, and logs the metrics to MLflow when it is configured."""
    import mlflow

    ann_file, images = split
    out, _ = first
    lines = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    partial = tmp_path / "out"
    (partial / "images").mkdir(parents=True)
    # The records of an actor's batch are written together: the first 2 lines are one batch's.
    (partial / "predictions.jsonl").write_text("".join(lines[:2]) + lines[2][:100])
    args = (export, images, "--annotations", ann_file, "--batch-size", 2, "--output", partial)
    summary = predict(*args, "--workers", 1)
    assert summary["predicted"] == IMAGES - 2
    assert summary["images"] == IMAGES
    assert len((partial / "predictions.jsonl").read_text().splitlines()) == IMAGES
    assert_same_results(partial, out)
    for name, value in first[1]["metrics"].items():
        assert summary["metrics"][name] == pytest.approx(value, abs=1e-4), name
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # the sqlite store's artifacts go to ./mlruns
    again = predict(*args, "--workers", 1, mlflow=True)
    assert again["predicted"] == 0 and again["metrics"] == summary["metrics"]
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(again["mlflow_run_id"])
    assert run.data.metrics["test/bbox_mAP"] == pytest.approx(summary["metrics"]["bbox_mAP"])


def test_bad_files_in_a_folder_are_listed_and_the_rest_predicted(
    first: tuple[Path, dict],
    export: Path,
    split: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A folder with 2 images, a file of random bytes, an empty JPEG (nested) and a text file:
    the images are predicted as in the first run (in one batch, as there), the two bad files
    are listed with their reason (printed too), the text file is not picked up."""
    ann_file, images = split
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    good = sorted(images.glob("*.png"))[:2]
    for name, image in zip(("a.png", "b.png"), good, strict=True):
        (folder / name).write_bytes(image.read_bytes())
    (folder / "noise.png").write_bytes(bytes(range(256)) * 8)
    (folder / "sub" / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    summary = predict(export, folder, "--workers", 1, "--batch-size", 2, "--output", out)
    assert summary["images"] == 2 and summary["predicted"] == 4
    bad = [str(folder / "noise.png"), str(folder / "sub" / "empty.jpg")]
    assert sorted(entry["file_name"] for entry in summary["skipped"]) == bad
    printed = capsys.readouterr().out
    assert "Skipped 2 images" in printed
    for entry in summary["skipped"]:
        assert entry["reason"].startswith("it cannot be read as an image (")
        assert f"  {entry['file_name']}: {entry['reason']}" in printed
    assert_same_results(out, first_results(first[0], ann_file, good, tmp_path / "first"))


def first_results(out: Path, ann_file: Path, images: list[Path], folder: Path) -> Path:
    """A folder with the first run's results of `images`, their ids 0, 1, ... as in a run on
    them alone."""
    coco = json.loads(ann_file.read_text())["images"]
    names = [path.name for path in images]
    ids = {image["id"]: names.index(image["file_name"]) for image in coco
           if image["file_name"] in names}  # fmt: skip
    folder.mkdir()
    for task in ("bbox", "segm"):
        results = json.loads((out / f"results.{task}.json").read_text())
        selected = [{**r, "image_id": ids[r["image_id"]]} for r in results if r["image_id"] in ids]
        (folder / f"results.{task}.json").write_text(json.dumps(selected))
    return folder


def test_bad_files_are_listed_and_the_rest_predicted_from_cloud_storage(
    first: tuple[Path, dict],
    split: tuple[Path, Path],
    export: Path,
    emulator: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gs:// prefix (the emulator) holding 2 images, a file of random bytes, a truncated
    JPEG and a text file: the images are predicted as from disk, the 2 bad files listed with
    their reason, the text file not picked up; the output written into the bucket as well."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    _, images = split
    good = sorted(images.glob("*.png"))[:2]
    jpeg = cv2.imencode(".jpg", cv2.imread(str(good[0])))[1].tobytes()
    client = storage.Client(
        project="test",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": emulator},
    )
    bucket = client.create_bucket("camera")
    for path in good:
        bucket.blob(f"day/{path.name}").upload_from_filename(path)
    bucket.blob("day/noise.png").upload_from_string(bytes(range(256)) * 8)
    bucket.blob("day/sub/cut.jpg").upload_from_string(jpeg[:200])  # headers only
    bucket.blob("day/notes.txt").upload_from_string(b"not an image")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)

    out = tmp_path / "out"
    summary = predict(export, "gs://camera/day", "--workers", 1, "--batch-size", 2, "--output", out)
    assert summary["images"] == 2 and summary["predicted"] == 4
    skipped = {entry["file_name"]: entry["reason"] for entry in summary["skipped"]}
    assert sorted(skipped) == ["gs://camera/day/noise.png", "gs://camera/day/sub/cut.jpg"]
    assert all(reason.startswith("it cannot be read as an image") for reason in skipped.values())
    index = json.loads((out / "images.json").read_text())
    assert index["skipped"] == summary["skipped"]
    assert [i["file_name"] for i in index["images"]] == [f"gs://camera/day/{p.name}" for p in good]
    assert [i["id"] for i in index["images"]] == [0, 1]
    assert_same_results(out, first_results(first[0], split[0], good, tmp_path / "first"))

    # Into the bucket: the same files, uploaded as the run ends; a rerun reads the records there
    # and predicts nothing.
    uri = "gs://camera/predicted/"
    again = predict(export, "gs://camera/day", "--workers", 1, "--batch-size", 2, "--output", uri)
    assert again["predicted"] == 4
    uploaded = {
        b.name.removeprefix("predicted/") for b in client.list_blobs("camera", prefix="predicted/")
    }
    assert {
        "predictions.jsonl",
        "images.json",
        "results.bbox.json",
        "results.segm.json",
    } <= uploaded
    for name in ("images.json", "results.bbox.json"):
        blob = bucket.blob(f"predicted/{name}").download_as_bytes()
        assert json.loads(blob) == json.loads((out / name).read_text()), name
    assert predict(export, "gs://camera/day", "--workers", 1, "--output", uri)["predicted"] == 0


def test_errors_before_any_worker_starts(
    local_ray: None, export: Path, split: tuple[Path, Path], tmp_path: Path
) -> None:
    ann_file, images = split
    image = next(images.glob("*.png"))
    cases = [
        ((tmp_path / "missing", image), r"^predict: Checkpoint .*missing does not exist"),
        ((export, tmp_path / "nothing"), r"^predict: Input .*nothing does not exist"),
        ((export, image, "--workers", 3), r"^predict: --workers .* is 3, but Ray sees 2 CPUs"),
        ((export, image, "--autoscale", "0,2"), r"^predict: --autoscale .*at least 1 worker"),
        ((export, image, "--workers", 2, "--worker-cpus", 2), r"for 2 workers is 4 CPUs, but Ray"),
        ((export, ann_file, "--annotations", ann_file), "is an annotation file"),
    ]  # fmt: skip
    for args, message in cases:
        with pytest.raises(SystemExit, match=message):
            # --address: on Ray Data; this process's Ray is kept (an unreachable one: below).
            predict(*args, "--address", "auto", "--output", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unreachable_address_is_one_line(export: Path, split: tuple[Path, Path]) -> None:
    port = free_port()
    image = next(split[1].glob("*.png"))
    command = [sys.executable, "-m", "on_ray", "predict", str(export), str(image)]
    done = subprocess.run([*command, "--address", f"127.0.0.1:{port}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"predict: --address 127.0.0.1:{port}: no Ray cluster"), last
