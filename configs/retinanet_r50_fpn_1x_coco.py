# RetinaNet R50-FPN, 1x schedule on COCO 2017: mmdet's recipe unchanged.
# Recipe: SGD lr 0.01 for a global batch of 16, 12 epochs; about 36.5 bbox mAP (mmdet model zoo).
_base_ = "mmdet::retinanet/retinanet_r50_fpn_1x_coco.py"
