# Mask R-CNN R50-FPN fine-tuned from mmdet's COCO-trained weights on a small dataset (100 to 1,000
# images, e.g. PennFudan): 16 epochs, a one-epoch linear warm-up whatever the batch size (mmdet's
# 500 iterations would be several epochs here), LR x0.1 at epochs 11 and 15.
_base_ = "./maskrcnn_r50_fpn_1x_coco.py"
max_epochs = 16
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(
        type="LinearLR",
        start_factor=0.001,
        by_epoch=True,
        begin=0,
        end=1,
        convert_to_iter_based=True,
    ),
    dict(
        type="MultiStepLR", by_epoch=True, begin=0, end=max_epochs, milestones=[11, 15], gamma=0.1
    ),
]
# COCO-trained weights (37.2 bbox / 34.1 segm mAP); the heads, sized to the dataset's classes, skip
# the COCO-shaped tensors. Downloaded once per host, hash checked (hyperparameter `load_from`
# replaces it, e.g. with a local path).
load_from = (
    "https://download.openmmlab.com/mmdetection/v2.0/mask_rcnn/mask_rcnn_r50_fpn_1x_coco/"
    "mask_rcnn_r50_fpn_1x_coco_20200205-d4b0c5d6.pth"
)
