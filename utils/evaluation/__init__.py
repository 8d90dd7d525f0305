"""COCO evaluation split over ranks, the validation pass that never leaves a rank waiting, the
evaluation report, its plots and drawings."""
