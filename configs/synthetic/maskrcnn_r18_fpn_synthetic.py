# Small Mask R-CNN for the generated shapes dataset: the demo and the tests' plumbing model.
_base_ = [
    "mmdet::_base_/models/mask-rcnn_r50_fpn.py",
    "./_base_/synthetic_data.py",
    "mmdet::_base_/default_runtime.py",
]
fpn_channels = 64
model = dict(
    backbone=dict(depth=18, frozen_stages=-1, norm_eval=False, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=fpn_channels),
    # Objects are 20 to 60 px: anchors from 16 px (scale 4 on stride 4) instead of COCO's 32.
    rpn_head=dict(
        in_channels=fpn_channels, feat_channels=fpn_channels, anchor_generator=dict(scales=[4])
    ),
    roi_head=dict(
        # RoIAlign dominates CPU time: a fixed 2x2 sampling grid instead of adaptive.
        bbox_roi_extractor=dict(out_channels=fpn_channels, roi_layer=dict(sampling_ratio=2)),
        bbox_head=dict(in_channels=fpn_channels, fc_out_channels=256, num_classes=3),
        mask_roi_extractor=dict(out_channels=fpn_channels, roi_layer=dict(sampling_ratio=2)),
        mask_head=dict(in_channels=fpn_channels, conv_out_channels=fpn_channels, num_classes=3),
    ),
    # At most 4 objects per image: fewer proposals and sampled RoIs than COCO's 2000/1000/512.
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(sampler=dict(num=64)),
    ),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=100)),
)
