"""Train MMDetection 3.x detectors with Determined: the cluster's entrypoint and the user's command.

    python3 model_def.py EXPERIMENT.yaml --local | --check     (see --help)
    python3 model_def.py export | predict | evaluate CHECKPOINT ...

The experiments name `model_def:MMDetTrial`; the Determined adapter lives in on_determined/, the
engine-free training session in utils/.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from on_determined.logs import quiet_engine_log
from utils.base.versions import check_versions


def main(argv: list[str] | None = None) -> Any:
    """`on_determined.cli.main`, after the version check; local runs and commands without
    Determined's own INFO lines (`on_determined/logs.py`)."""
    # mmengine imports pkg_resources (hence setuptools<82); its deprecation notice is noise.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    check_versions()  # before mmdet is imported: on a wrong mmcv it fails with a bare assert
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv:  # a local run, --check or a command; a cluster trial (no arguments) logs as before
        quiet_engine_log()
    from on_determined.cli import main as cli_main

    return cli_main(argv)


def __getattr__(name: str) -> Any:
    # `model_def:MMDetTrial` (the experiments' entrypoint) without importing mmdet at import.
    if name == "MMDetTrial":
        from on_determined.trial import MMDetTrial

        return MMDetTrial
    raise AttributeError(name)


if __name__ == "__main__":
    # A run that stops on bad input or on purpose ends with its message, not a traceback: the
    # message names the file, key or batch and what to do. Other errors (bugs) keep theirs.
    from utils.base.errors import USER_ERRORS

    try:
        main(sys.argv[1:])
    except USER_ERRORS as err:
        sys.exit(f"model_def.py: {err}")
