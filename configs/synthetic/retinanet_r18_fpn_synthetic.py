# Small RetinaNet for the generated shapes dataset (boxes only).
_base_ = [
    "mmdet::_base_/models/retinanet_r50_fpn.py",
    "./_base_/synthetic_data.py",
    "mmdet::_base_/default_runtime.py",
]
fpn_channels = 64
model = dict(
    backbone=dict(depth=18, frozen_stages=-1, norm_eval=False, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=fpn_channels),
    bbox_head=dict(
        num_classes=3,
        in_channels=fpn_channels,
        feat_channels=fpn_channels,
        stacked_convs=2,
        # Objects are 20 to 60 px: start the anchors at 16 px on the stride-8 level.
        anchor_generator=dict(octave_base_scale=2),
    ),
)
optim_wrapper = dict(optimizer=dict(lr=0.01))
val_evaluator = dict(metric="bbox")
test_evaluator = val_evaluator
