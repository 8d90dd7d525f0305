# YOLOX-s on COCO 2017: mmdet's recipe unchanged (from scratch, 640 px, Mosaic and MixUp).
# Recipe: SGD (Nesterov) lr 0.01 for a global batch of 64 (8 x 8), 300 epochs; about 40.7 bbox mAP
# (mmdet model zoo). Its custom hooks run in the trial: the last 15 epochs without Mosaic,
# RandomAffine and MixUp and with the L1 loss, norm statistics synced over the ranks before each
# validation, and EMA weights (validated and exported).
_base_ = "mmdet::yolox/yolox_s_8xb8-300e_coco.py"
