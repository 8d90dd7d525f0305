# The small RetinaNet of retinanet_r18_fpn_synthetic.py on VOC-layout data: VOCDataset, VOCMetric,
# 128 px images, the 3 generated shape classes. For tests of `data.format: voc` (the experiment's
# `data` section fills in the paths); boxes only, as VOC has no masks.
_base_ = "./retinanet_r18_fpn_synthetic.py"
dataset_type = "VOCDataset"
classes = ("circle", "square", "triangle")
image_scale = (128, 128)
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=image_scale, keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=image_scale, keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(
        type="PackDetInputs",
        meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"),
    ),
]
train_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type=dataset_type,
        data_root="data/VOCdevkit/",
        ann_file="VOC2007/ImageSets/Main/trainval.txt",
        data_prefix=dict(sub_data_root="VOC2007/"),
        metainfo=dict(classes=classes),
        # No bbox_min_size (mmdet's VOC configs ignore boxes under 32 px): the shapes are 20-60 px.
        filter_cfg=dict(filter_empty_gt=True, min_size=8),
        pipeline=train_pipeline,
    )
)
val_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type=dataset_type,
        data_root="data/VOCdevkit/",
        ann_file="VOC2007/ImageSets/Main/test.txt",
        data_prefix=dict(sub_data_root="VOC2007/"),
        metainfo=dict(classes=classes),
        test_mode=True,
        pipeline=test_pipeline,
    )
)
test_dataloader = val_dataloader
val_evaluator = dict(_delete_=True, type="VOCMetric", metric="mAP", eval_mode="11points")
test_evaluator = val_evaluator
