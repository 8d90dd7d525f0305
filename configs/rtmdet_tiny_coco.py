# RTMDet-tiny on COCO 2017: mmdet's recipe unchanged (CSPNeXt-tiny from its ImageNet weights).
# Recipe: AdamW lr 0.004 for a global batch of 256 (8 x 32), 300 epochs; about 41.1 bbox mAP
# (mmdet model zoo). Its custom hooks run in the trial: EMA weights (ExpMomentumEMA), validated
# and exported, and the switch to the lighter stage-2 pipeline for the last 20 epochs.
_base_ = "mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py"
