"""The package's error types, in one light module: importing one costs nothing.

Each error's message names the file, key or value at fault and says what to do; the command line
prints it as one line.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A problem in the trial's hyperparameters or config files, with what to do about it."""


class DataError(ValueError):
    """A problem in the experiment's `data` section or in the data, with what to do about it."""


class AnnotationError(ValueError):
    """An annotation file mmdet cannot train from, naming the file, the entry and the fix."""


class ExperimentError(ValueError):
    """A problem in an experiment YAML or in a `--set` override, with what to do about it."""


class ExportError(ValueError):
    """A checkpoint that cannot be exported or loaded, with what to do about it."""


class PredictError(ValueError):
    """Bad input to the predict command, naming the path and what to do."""


class TrackingError(ValueError):
    """A problem with the `data.mlflow` section or the tracking server, with what to do."""


class ImageError(RuntimeError):
    """A training or validation image that cannot be loaded, named with what to do."""


class WeightsError(RuntimeError):
    """Pretrained weights could not be fetched or read; the message names the file or URL."""


class StageError(RuntimeError):
    """A training step or validation failed inside mmdet, mmcv or mmengine; the message names the
    stage, the transform or config key to look at, and the image (e.g. the start-up sanity pass)."""


class TrainingStopped(RuntimeError):
    """A run stopped on purpose (e.g. a non-finite loss), saying why and how to go on."""


# What a command reports as one line (the message says what to do) instead of a traceback.
USER_ERRORS = (
    ConfigError,
    DataError,
    AnnotationError,
    ExperimentError,
    ExportError,
    PredictError,
    TrackingError,
    ImageError,
    WeightsError,
    StageError,
    TrainingStopped,
)


def raise_problems(problems: list[str], error: type[Exception]) -> None:
    """Raise `error` with every problem found (each names its key and what to do), if any."""
    if problems:
        raise error(" ".join(problems))
