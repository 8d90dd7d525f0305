# Small GFL for the generated shapes dataset: the RetinaNet variant with mmdet's GFL head and ATSS.
_base_ = "./retinanet_r18_fpn_synthetic.py"
model = dict(
    type="GFL",
    bbox_head=dict(
        _delete_=True,
        type="GFLHead",
        num_classes=3,
        in_channels={{_base_.fpn_channels}},
        stacked_convs=2,
        feat_channels={{_base_.fpn_channels}},
        anchor_generator=dict(
            type="AnchorGenerator",
            ratios=[1.0],
            octave_base_scale=4,
            scales_per_octave=1,
            strides=[8, 16, 32, 64, 128],
        ),
        loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_dfl=dict(type="DistributionFocalLoss", loss_weight=0.25),
        reg_max=16,
        loss_bbox=dict(type="GIoULoss", loss_weight=2.0),
    ),
    train_cfg=dict(
        _delete_=True, assigner=dict(type="ATSSAssigner", topk=9), allowed_border=-1, pos_weight=-1
    ),
    test_cfg=dict(
        _delete_=True,
        nms_pre=1000,
        min_bbox_size=0,
        score_thr=0.05,
        nms=dict(type="nms", iou_threshold=0.6),
        max_per_img=100,
    ),
)
