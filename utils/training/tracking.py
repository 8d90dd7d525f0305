"""Optional MLflow tracking of a training run: params, metrics, the config and checkpoint files.

Enabled by a `data.mlflow` mapping in the experiment YAML or by `MLFLOW_TRACKING_URI` in the
environment. The section sits under `data` because Determined's master refuses unknown top-level
keys of an experiment config and `data` is the part of its schema that takes free-form content.
`mlflow` itself is imported only when tracking is enabled.

    data:
      mlflow:
        tracking_uri: http://mlflow.example.com:5000  # else $MLFLOW_TRACKING_URI
        experiment_name: coco-detectors  # else $MLFLOW_EXPERIMENT_NAME, else the experiment's name
        tags: {team: vision}

Credentials stay out of the YAML (MLflow reads MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN) and
out of the run: user:password in URIs is redacted and secret-looking params are not logged.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import numbers
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from utils.base.errors import TrackingError
from utils.training.tracking_settings import MlflowSettings

logger = logging.getLogger(__name__)

# In each checkpoint a tracked run writes: the run's id, where later evaluations log to.
RUN_FILE = "mlflow_run.json"
# MLflow's limits (mlflow.utils.validation), fixed here to keep mlflow unimported when disabled.
MAX_PARAM_VALUE = 6000
MAX_NAME = 250
_NOT_IN_NAME = re.compile(r"[^\w\-. /:]")
# Words of a param name that mark its value as a secret (matched as whole words, not substrings).
SECRET_WORDS = {
    "password", "passwd", "token", "secret", "key", "apikey", "credential", "credentials",
    "signature", "sig",
}  # fmt: skip
_URI_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/@\s]+@")
_QUERY_ITEM = re.compile(r"([?&;])([^=&;#\s]+)=([^&;#\s]*)")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def loggable_params(tree: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """MLflow params of a nested mapping (values redacted and cut to MLflow's limit), and the
    names left out because they look like secrets."""
    params, skipped = {}, []
    for name, value in flatten(tree).items():
        if looks_secret(name):
            skipped.append(name)
            continue
        params[_mlflow_name(name)] = redact(str(value))[:MAX_PARAM_VALUE]
    return params, skipped


def _mlflow_name(name: str) -> str:
    """A name MLflow accepts: its characters and length."""
    return _NOT_IN_NAME.sub("_", name)[:MAX_NAME]


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The real-number entries of a metrics dict, as floats under names MLflow accepts."""
    return {
        _mlflow_name(name): float(value)
        for name, value in metrics.items()
        if isinstance(value, numbers.Real) and not isinstance(value, bool)
    }


class MlflowRun:
    """One MLflow run, logged through `MlflowClient` (no global active run)."""

    def __init__(self, settings: MlflowSettings) -> None:
        from mlflow.tracking import MlflowClient

        self.settings = settings
        self.client = MlflowClient(tracking_uri=settings.tracking_uri)
        self.where = redact(self.client.tracking_uri)
        self.run_id: str | None = None
        self._export: Path | None = None  # a copy of the latest checkpoint's mmdet/ folder
        self._export_step: int | None = None

    def start(
        self, run_name: str, description: str, tags: Mapping[str, str], run_id: str | None = None
    ) -> bool:
        """Start the run, or continue `run_id` (a resumed trial) when the server has it; returns
        whether a new run was created."""
        from mlflow.exceptions import MlflowException

        try:
            if run_id and self._exists(run_id):
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                logger.info("MLflow: continuing run %s at %s.", run_id, self.where)
                return False
            experiment_id = self._experiment_id()
            all_tags = {**tags, **self.settings.tags, "mlflow.note.content": description}
            run = self.client.create_run(
                experiment_id,
                run_name=run_name,
                tags={k: redact(str(v)) for k, v in all_tags.items() if v},
            )
        except MlflowException as err:
            raise TrackingError(
                f"MLflow tracking at {self.where} failed ({redact(str(err.message))}): check "
                "data.mlflow.tracking_uri or MLFLOW_TRACKING_URI, and that the server is up."
            ) from err
        self.run_id = run.info.run_id
        logger.info(
            "MLflow: run %s in experiment %r at %s.",
            self.run_id,
            self.settings.experiment_name,
            self.where,
        )
        return True

    def attach(self, run_id: str) -> bool:
        """Log into the existing run `run_id` as it is (its status unchanged), if the server has
        it; returns whether it does."""
        if not self._exists(run_id):
            return False
        self.run_id = run_id
        return True

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            logger.warning("MLflow: run %s of the checkpoint is not at %s.", run_id, self.where)
            return False
        return True

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.settings.experiment_name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another trial of the search created it meanwhile
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def log_params(self, tree: Mapping[str, Any]) -> None:
        params, skipped = loggable_params(tree)
        if skipped:
            logger.info("MLflow: not logging params that look like secrets: %s", ", ".join(skipped))
        from mlflow.entities import Param

        self._guard(
            "params",
            self.client.log_batch,
            self.run_id,
            params=[Param(k, v) for k, v in params.items()],
        )

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(k, v, now, step) for k, v in numeric_metrics(metrics).items()]
        self._guard("metrics", self.client.log_batch, self.run_id, metrics=entries)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._guard(artifact_file, self.client.log_text, self.run_id, text, artifact_file)

    def log_folder(self, folder: str | Path, artifact_path: str) -> None:
        self._guard(
            artifact_path, self.client.log_artifacts, self.run_id, str(folder), artifact_path
        )

    def log_checkpoint(self, checkpoint_dir: str | Path, step: int) -> None:
        """Log the checkpoint's `predictions/*.png` and `evaluation/*` (under `<folder>/batch_
        <step>`), keep a copy of its `mmdet/` export, uploaded by `end`: the run gets the last one
        only; and name the run in the checkpoint (RUN_FILE), for its later evaluations."""
        checkpoint_dir = Path(checkpoint_dir)
        (checkpoint_dir / RUN_FILE).write_text(
            json.dumps({"run_id": self.run_id, "tracking_uri": self.where})
        )
        for folder in ("predictions", "evaluation"):
            for path in sorted(p for p in (checkpoint_dir / folder).glob("*") if p.is_file()):
                where = f"{folder}/batch_{step:07d}"
                self._guard(path.name, self.client.log_artifact, self.run_id, str(path), where)
        export = checkpoint_dir / "mmdet"
        if export.is_dir() and any(export.iterdir()):
            # The checkpoint folder may be uploaded and deleted before the run ends (cloud storage).
            if self._export is None:
                self._export = Path(tempfile.mkdtemp(prefix="mlflow-export-"))
            shutil.rmtree(self._export / "mmdet", ignore_errors=True)
            shutil.copytree(export, self._export / "mmdet")
            self._export_step = step

    def set_tag(self, key: str, value: str) -> None:
        self._guard(key, self.client.set_tag, self.run_id, key, redact(value))

    def end(self, status: str) -> None:
        """Upload the last checkpoint's mmdet export and end the run with `status` (FINISHED,
        FAILED or KILLED)."""
        if self.run_id is None:
            return
        if self._export is not None:
            self.set_tag("mmdet_export_batches", str(self._export_step))
            self.log_folder(self._export / "mmdet", "mmdet")
            shutil.rmtree(self._export, ignore_errors=True)
            self._export = None
        # MLflow prints the run's URL, credentials of the tracking URI included.
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            self._guard("run end", self.client.set_terminated, self.run_id, status)
        print(redact(printed.getvalue()), end="", flush=True)
        logger.info("MLflow: run %s ended %s.", self.run_id, status)

    def _guard(self, what: str, call: Any, *args: Any, **kwargs: Any) -> None:
        """Call the client; a tracking failure is reported, and training goes on (Determined keeps
        the metrics and checkpoints regardless)."""
        from mlflow.exceptions import MlflowException

        try:
            call(*args, **kwargs)
        except (MlflowException, OSError) as err:
            logger.warning(
                "MLflow: logging %s to %s failed: %s", what, self.where, redact(str(err))
            )


def redact(text: str) -> str:
    """`text` with the user info of URIs and secret-looking query values replaced by ***."""
    text = _URI_USERINFO.sub(r"\1***@", text)
    return _QUERY_ITEM.sub(
        lambda m: f"{m[1]}{m[2]}=***" if looks_secret(m[2]) else m[0],
        text,
    )


def looks_secret(name: str) -> bool:
    """Whether a (dotted, snake or camel case) name has a word such as password, token or key."""
    words = re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", name)
    return any(word.lower() in SECRET_WORDS for word in words)
