"""What every Ray Tune search test checks of its ASHA search tracked in a real MLflow server."""

from __future__ import annotations

from pathlib import Path

import pytest

from on_ray.tune import best_checkpoint, best_result


def assert_tracked_asha_search(
    results: object,
    trials: int,
    mlflow_server: str,
    experiment_name: str,
    cache: Path,
    scratch: Path,
) -> Path:
    """`trials` trials at as many points, ASHA stopped one at a lower rung, each trial an MLflow
    run with its point and a validation a batch, and `predict` takes the best trial's checkpoint
    (returned) and an image of the generated data in `cache`."""
    from mlflow.tracking import MlflowClient

    import model_def

    assert len(results) == trials and not results.errors
    lengths = sorted(int(r.metrics["batches"]) for r in results)
    assert lengths[-1] == 4 and lengths[0] < 4, lengths  # ASHA stopped one at a lower rung
    assert len({r.config["lr"] for r in results}) == trials  # different points
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    logged = sorted(float(r.data.params["lr"]) for r in runs)
    assert logged == pytest.approx(sorted(r.config["lr"] for r in results), rel=1e-12)
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "bbox_mAP")]
        assert steps and steps == list(range(1, len(steps) + 1)), steps  # a validation a batch
    best = Path(best_checkpoint(best_result(results, "bbox_mAP", "max")))
    image = next(cache.rglob("val/*.png"))
    summary = model_def.main(["predict", str(best), str(image), "--out", str(scratch)])
    assert summary["images"] == 1 and scratch.is_dir()
    return best
