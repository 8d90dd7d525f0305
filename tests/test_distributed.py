"""Real multi-process runs: `torchrun --nproc_per_node=2 -- model_def.py ... --local`, gloo."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_SYNTHETIC

REPO = Path(__file__).resolve().parent.parent
# 7 validation images: not divisible by 2 ranks nor by the batch size.
DATA = {**TINY_SYNTHETIC, "num_val": 7}

pytestmark = pytest.mark.slow


def run(output: Path, cache: Path, ranks: int, *extra: str) -> list[dict]:
    """Train GFL (small) with `ranks` processes; returns the records of metrics.jsonl."""
    script = [str(REPO / "model_def.py"), str(REPO / "experiments" / "demo.yaml"), "--local"]
    args = [
        "--output",
        str(output),
        "--report-every",
        "1",
        "--set",
        "hyperparameters.config_file=configs/synthetic/gfl_r18_fpn_synthetic.py",
        "--set",
        "hyperparameters.global_batch_size=4",
        "--set",
        "hyperparameters.override_mmdet_config={model.backbone.norm_eval: true}",
        "--set",
        f"data.cache_dir={cache}",
        "--set",
        f"data.synthetic={json.dumps(DATA)}",
        *extra,
    ]
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        launcher += ["--"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*launcher, *script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def losses(records: list[dict]) -> dict[int, float]:
    return {r["batches"]: r["metrics"]["loss"] for r in records if r["kind"] == "training"}


def test_two_ranks_share_the_global_batch_and_evaluate_each_image_once(
    tmp_path: Path, synthetic_cache: Path
) -> None:
    records = run(tmp_path, synthetic_cache, 2, "--max-batches", "6")
    assert sorted(losses(records)) == list(range(1, 7))
    assert all(math.isfinite(loss) for loss in losses(records).values())
    (validation,) = [r["metrics"] for r in records if r["kind"] == "validation"]
    # 7 images over 2 ranks in batches the ranks share unevenly: each counted exactly once.
    assert validation["num_images"] == DATA["num_val"]
    assert len([k for k in validation if k.startswith("bbox_")]) == 12
    (checkpoint,) = (tmp_path / "determined").iterdir()
    assert (checkpoint / "state_dict.pth").is_file()


@pytest.mark.parametrize("ranks", [1, 2])
def test_resume_continues_exactly_on_ranks(
    tmp_path: Path, synthetic_cache: Path, ranks: int
) -> None:
    straight = run(tmp_path / "straight", synthetic_cache, ranks, "--max-batches", "6")
    run(tmp_path / "first", synthetic_cache, ranks, "--max-batches", "3")
    (checkpoint,) = (tmp_path / "first" / "determined").iterdir()
    resumed = run(
        tmp_path / "second",
        synthetic_cache,
        ranks,
        "--max-batches",
        "6",
        "--resume",
        str(checkpoint),
    )
    expected = {b: loss for b, loss in losses(straight).items() if b > 3}
    assert sorted(losses(resumed)) == [4, 5, 6]
    assert losses(resumed) == pytest.approx(expected, rel=1e-6)
