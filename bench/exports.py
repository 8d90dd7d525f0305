"""What the inference sections (bench.serve, bench.batch_predict) measure with: a Mask R-CNN
R18-FPN export with seeded initial weights, as the tests' model, and generated 128 px images.

Untrained, the model gives every image the test_cfg's 100 detections with masks, so each side
does the whole post-processing; writing it takes seconds, with no training run.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "synthetic" / "maskrcnn_r18_fpn_synthetic.py"


def make_export(folder: Path) -> Path:
    """The seeded Mask R-CNN R18-FPN export in `folder` (nothing trained)."""
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    from utils.data.synthetic import CLASSES
    from utils.training.export import write_export

    register_all_modules()
    cfg = Config.fromfile(CONFIG)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    palette = [(220, 20, 60), (0, 128, 0), (0, 0, 255)]
    return write_export(folder, model.state_dict(), cfg, {"classes": CLASSES, "palette": palette})


def images_folder(folder: Path, count: int) -> Path:
    """A folder of `count` generated 128 px validation images."""
    from utils.data.synthetic import SyntheticSpec, ensure_dataset

    root = ensure_dataset(folder / "synthetic", SyntheticSpec(num_train=1, num_val=count))
    return root / "val"
