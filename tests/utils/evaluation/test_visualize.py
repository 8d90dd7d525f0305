"""Validation images with predictions, drawn by mmdet's visualizer: TensorBoard and checkpoints."""

from __future__ import annotations

from pathlib import Path

import mmcv
import numpy as np
import pytest
import torch
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks
from mmengine.structures import InstanceData
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import model_def  # noqa: F401  (checks the pinned stack before mmdet is used)
from tests.conftest import train
from utils.base.errors import ConfigError
from utils.check.experiment import hparam_problems
from utils.evaluation.drawings import draw_sample, sample_indices, visualization_settings

CONFIG = "configs/synthetic/maskrcnn_r18_fpn_synthetic.py"
META = {"classes": ("circle", "square", "triangle"), "palette": [(220, 20, 60), (0, 0, 142)] * 2}


def box_mask(box: tuple[int, int, int, int], size: int = 128) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[box[1] : box[3], box[0] : box[2]] = 1
    return mask


def synthetic_sample() -> DetDataSample:
    """A square on the left as ground truth; a confident and a weak prediction."""
    sample = DetDataSample()
    sample.gt_instances = InstanceData(
        bboxes=torch.tensor([[10.0, 10.0, 50.0, 50.0]]),
        labels=torch.tensor([1]),
        masks=BitmapMasks(box_mask((10, 10, 50, 50))[None], 128, 128),
    )
    sample.pred_instances = InstanceData(
        bboxes=torch.tensor([[12.0, 12.0, 52.0, 52.0], [70.0, 70.0, 110.0, 110.0]]),
        labels=torch.tensor([1, 0]),
        scores=torch.tensor([0.9, 0.2]),
        masks=torch.from_numpy(
            np.stack([box_mask((12, 12, 52, 52)), box_mask((70, 70, 110, 110))]).astype(bool)
        ),
    )
    return sample


def test_draw_sample_draws_ground_truth_and_predictions_above_the_threshold() -> None:
    image = np.full((128, 128, 3), 128, dtype=np.uint8)
    drawing = draw_sample(image, synthetic_sample(), META, score_thr=0.5)
    # Upscaled 4x to 512 px, ground truth left of the predictions, under a caption band.
    band = drawing.shape[0] - 512
    assert drawing.dtype == np.uint8 and drawing.shape[1:] == (1024, 3) and 16 <= band <= 64
    gt, pred = drawing[band:, :512], drawing[band:, 512:]

    def changed(half: np.ndarray, box: tuple[int, int, int, int]) -> float:
        """Share of the pixels of the (4x) box that differ from the grey image."""
        x0, y0, x1, y1 = (4 * v for v in box)
        return float((half[y0:y1, x0:x1] != 128).any(axis=2).mean())

    assert changed(gt, (10, 10, 50, 50)) > 0.9  # mask and box drawn
    assert changed(pred, (12, 12, 52, 52)) > 0.9  # the confident prediction
    assert changed(pred, (70, 70, 110, 110)) == 0.0  # 0.2 is below the threshold
    assert changed(gt, (70, 70, 110, 110)) == 0.0
    assert (gt[:, 100:] != pred[:, 100:]).any()  # the two halves show different things

    alone = draw_sample(image, synthetic_sample(), META, score_thr=0.1, with_gt=False)
    assert alone.shape[1:] == (512, 3)
    assert (alone[band:][4 * 70 : 4 * 110, 4 * 70 : 4 * 110] != 128).any(axis=2).mean() > 0.9
    # A large image is drawn at its size.
    large = draw_sample(np.zeros((600, 800, 3), np.uint8), DetDataSample(), META, 0.3, False)
    assert large.shape[1:] == (800, 3) and large.shape[0] > 600


def test_draw_sample_leaves_out_inverted_boxes() -> None:
    sample = synthetic_sample()
    sample.pred_instances.bboxes[1] = torch.tensor([110.0, 70.0, 70.0, 110.0])  # x1 > x2
    drawing = draw_sample(np.full((128, 128, 3), 128, np.uint8), sample, META, 0.1, False)
    band = drawing.shape[0] - 512
    assert (drawing[band:][4 * 12 : 4 * 52, 4 * 12 : 4 * 52] != 128).any(axis=2).mean() > 0.9
    assert (drawing[band:][4 * 72 : 4 * 108, 4 * 72 : 4 * 108] == 128).all()


def test_draw_sample_refuses_a_non_rgb_image() -> None:
    with pytest.raises(ValueError, match="RGB, HxWx3 uint8"):
        draw_sample(np.zeros((128, 128), np.uint8), synthetic_sample(), META, 0.3)


def test_settings_and_sample_indices() -> None:
    assert visualization_settings({}) == (8, 0.3)
    assert visualization_settings({"visualization": {"num_images": 0}}) == (0, 0.3)
    bad = [
        ({"num_images": -1}, "visualization.num_images is -1"),
        ({"score_thr": 1.5}, "visualization.score_thr is 1.5"),
        ({"num_images": True}, "visualization.num_images is True"),
        ({"num_imgs": 4}, "visualization.num_imgs is not a setting"),
        (8, "visualization is 8: use a mapping"),
    ]
    for spec, message in bad:
        with pytest.raises(ConfigError, match=message):
            visualization_settings({"visualization": spec})
    # The pre-submission check reports the same problems.
    (problem,) = hparam_problems({"visualization": {"score_thr": "high"}}, slots=1)
    assert "visualization.score_thr is 'high'" in problem
    assert hparam_problems({"visualization": {"num_images": 4, "score_thr": 0.5}}, slots=1) == []
    assert sample_indices(3, 8) == [0, 4, 7]
    assert sample_indices(8, 5) == [0, 1, 2, 3, 4]
    assert sample_indices(0, 8) == []


def read_images(tensorboard: Path) -> tuple[EventAccumulator, dict[str, list]]:
    events = EventAccumulator(str(tensorboard), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = [tag for tag in events.Tags()["images"] if tag.startswith("predictions/")]
    return events, {tag: events.Images(tag) for tag in tags}


def test_validation_images_in_tensorboard_and_checkpoint(
    tmp_path: Path, synthetic_data: dict
) -> None:
    settings = "hyperparameters.visualization={num_images: 3}"
    train(tmp_path, CONFIG, synthetic_data, "--max-batches", "2", "--set", settings)
    _, images = read_images(tmp_path / "tensorboard")
    # Evenly spread over the 8 validation images, drawn once, at the batch count.
    names = ["000000", "000004", "000007"]
    assert sorted(images) == [f"predictions/{name}" for name in names]
    (checkpoint,) = (tmp_path / "determined").iterdir()
    assert sorted(p.name for p in (checkpoint / "predictions").iterdir()) == [
        f"{name}.png" for name in names
    ]
    for name in names:
        (event,) = images[f"predictions/{name}"]
        assert event.step == 2
        logged = mmcv.imfrombytes(event.encoded_image_string, channel_order="rgb")
        assert logged.shape[1] == 1024 and 512 < logged.shape[0] == event.height
        saved = mmcv.imread(checkpoint / "predictions" / f"{name}.png", channel_order="rgb")
        np.testing.assert_array_equal(saved, logged)


def test_no_images_when_disabled(tmp_path: Path, synthetic_data: dict) -> None:
    settings = "hyperparameters.visualization={num_images: 0}"
    train(tmp_path, CONFIG, synthetic_data, "--max-batches", "1", "--set", settings)
    events, images = read_images(tmp_path / "tensorboard")
    assert "Determined/val_bbox_mAP" in events.Tags()["scalars"]  # the run did log to this folder
    assert images == {}
    (checkpoint,) = (tmp_path / "determined").iterdir()
    assert (checkpoint / "state_dict.pth").is_file()
    assert not (checkpoint / "predictions").exists()
