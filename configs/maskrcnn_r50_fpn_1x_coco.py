# Mask R-CNN R50-FPN, 1x schedule on COCO 2017: mmdet's recipe unchanged.
# Recipe: SGD lr 0.02 for a global batch of 16 (8 GPUs x 2 images), 12 epochs, LR x0.1 at epochs 8
# and 11, linear warm-up over 500 iterations. About 38.2 bbox / 34.7 segm mAP (mmdet model zoo).
_base_ = "mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"
