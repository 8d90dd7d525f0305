"""A toy mmdet detector whose loss is a plain mean over images, for gradient-sync tests.

Real mmdet heads normalise some loss terms per process (GFL's box terms add up over images), so
their distributed gradients differ from one process by design, in mmdet's own training too. This
model isolates what the trial does: slicing global batches, DDP, the schedule.
"""

from __future__ import annotations

import torch
from mmdet.models.detectors.base import BaseDetector
from mmdet.registry import MODELS
from mmengine.structures import InstanceData
from torch import nn


@MODELS.register_module()
class ToyDetector(BaseDetector):
    """Predicts one box per image from pooled conv features; regresses the first ground truth."""

    def __init__(self, data_preprocessor: dict | None = None, init_cfg: dict | None = None) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)  # box (x1, y1, x2, y2) in image units, and a score logit

    def extract_feat(self, batch_inputs: torch.Tensor) -> torch.Tensor:
        return self.conv(batch_inputs).relu().mean(dim=(2, 3))

    def _boxes(self, batch_inputs: torch.Tensor) -> torch.Tensor:
        out = self.head(self.extract_feat(batch_inputs))
        size = batch_inputs.new_tensor(batch_inputs.shape[-1:-3:-1] * 2)
        return torch.cat([out[:, :4].sigmoid() * size, out[:, 4:]], dim=1)

    def loss(self, batch_inputs: torch.Tensor, batch_data_samples: list) -> dict:
        boxes = self._boxes(batch_inputs)
        targets = torch.stack([s.gt_instances.bboxes[0] for s in batch_data_samples])
        return {"loss_box": ((boxes[:, :4] - targets) / 128).pow(2).mean()}

    def predict(self, batch_inputs: torch.Tensor, batch_data_samples: list) -> list:
        """The learned box, plus (for evaluation tests) the ground truth jittered per image.

        The jittered ground truth, scored by the network, gives COCO metrics far from 0 and 1, so
        comparing evaluations across ranks compares real numbers, not zeros.
        """
        boxes = self._boxes(batch_inputs)
        for sample, box in zip(batch_data_samples, boxes, strict=True):
            scale = box.new_tensor(sample.scale_factor * 2)
            gt = sample.gt_instances
            if "bboxes" not in gt:  # an image without annotations (predict): the box alone
                sample.pred_instances = InstanceData(
                    bboxes=(box[:4] / scale)[None],
                    scores=box[4:].sigmoid(),
                    labels=torch.zeros(1, dtype=torch.long),
                )
                continue
            noise = torch.Generator().manual_seed(int(sample.img_id))
            jitter = torch.randn(gt.bboxes.shape, generator=noise) * 3.0
            scores = torch.rand(len(gt.labels), generator=noise) * box[4:].sigmoid()
            sample.pred_instances = InstanceData(
                bboxes=torch.cat([(box[:4] / scale)[None], (gt.bboxes + jitter) / scale]),
                scores=torch.cat([box[4:].sigmoid(), scores]),
                labels=torch.cat([torch.zeros(1, dtype=torch.long), gt.labels]),
            )
        return batch_data_samples

    def _forward(self, batch_inputs: torch.Tensor, batch_data_samples: list | None = None):
        return self._boxes(batch_inputs)
