"""Determined as one engine of the core: the only package that imports `determined`.

- `trial`: the PyTorchTrial: the core's train step and validation pass on Determined's context.
- `callbacks`: Determined's events forwarded to the core's validation pass and run outputs.
- `local`: local runs through Determined's Trainer (one process, or one per slot under torchrun).
- `checkpoints`, `commands`: Determined checkpoint folders (fetch by UUID, weights, export) for
  the shared `export`, `predict` and `evaluate` commands.
- `context`: what a trial's container holds (the uploaded context, the mounted data), for
  `--check`.
- `logs`: Determined's per-report INFO lines kept off a local console.
- `cli`: `model_def.py`'s command line.
"""
