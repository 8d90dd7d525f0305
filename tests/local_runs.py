"""Local Determined runs in their own processes (one, or one per rank under torchrun), for the
tests that compare other engines or settings with them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import FEW_DRAWINGS, REPO, SGD_SETS, TINY_SYNTHETIC

# 7 validation images: not divisible by 2 ranks nor by the batch size.
DATA = {**TINY_SYNTHETIC, "num_val": 7}

GFL = "configs/synthetic/gfl_r18_fpn_synthetic.py"
TOY = "tests/toy/toy_synthetic.py"


def run(
    output: Path, cache: Path, ranks: int, *extra: str, config: str = GFL, overrides: str = ""
) -> list[dict]:
    """Train with `ranks` processes (GFL, small, by default); returns metrics.jsonl's records."""
    script = [str(REPO / "model_def.py"), str(REPO / "experiments" / "demo.yaml"), "--local"]
    args = [
        "--output",
        str(output),
        "--report-every",
        "1",
        "--set",
        f"hyperparameters.config_file={config}",
        "--set",
        "hyperparameters.global_batch_size=4",
        "--set",
        f"hyperparameters.override_mmdet_config={{{overrides}}}",
        "--set",
        f"data.cache_dir={cache}",
        "--set",
        f"data.synthetic={json.dumps(DATA)}",
        *(part for value in (*SGD_SETS, FEW_DRAWINGS) for part in ("--set", value)),
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
