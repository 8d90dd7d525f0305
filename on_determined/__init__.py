"""Determined as one engine of the training session: the only package that imports `determined`.

- `trial`: the PyTorchTrial wrapping `utils.training.session.TrainingSession`.
- `callbacks`: the trial's callbacks, in one ordered list.
- `local`: local runs through Determined's Trainer (one process, or one per slot under torchrun).
- `checkpoints`: Determined checkpoint folders (fetch by UUID, weights, config, export).
- `commands`, `cli`: `model_def.py`'s command line.
"""
