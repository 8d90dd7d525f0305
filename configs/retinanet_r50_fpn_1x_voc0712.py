# RetinaNet R50-FPN, 1x schedule on PASCAL VOC 07+12: mmdet's recipe unchanged.
# Recipe: SGD lr 0.01 for a global batch of 16; the training set (VOC2007 + VOC2012 trainval) is
# repeated 3 times per epoch for 4 epochs (12 passes), validated on VOC2007 test with 11-point
# mAP@0.5: 77.3 (mmdet's pascal_voc README). The experiment's `data` section (format: voc) points
# it at the VOCdevkit folder and years.
_base_ = "mmdet::pascal_voc/retinanet_r50_fpn_1x_voc0712.py"
