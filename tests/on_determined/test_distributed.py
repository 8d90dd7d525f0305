"""Real multi-process runs: `torchrun --nproc_per_node=2 -- model_def.py ... --local`, gloo."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.local_runs import DATA, TOY, losses, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, synthetic_cache: Path) -> Path:
    """The output of one 2-rank run of the toy detector (6 batches, across an epoch's end),
    which detects enough by then for validation metrics to compare: the tests below compare
    their runs with it."""
    output = tmp_path_factory.mktemp("two-ranks")
    run(output, synthetic_cache, 2, "--max-batches", "6", config=TOY)
    return output


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory: pytest.TempPathFactory, synthetic_cache: Path) -> dict:
    """Two 2-rank runs started at once: the first half (3 batches) of the resume test's run,
    and the shared run without the start-up sanity pass; their outputs by name."""
    folder = tmp_path_factory.mktemp("side-by-side")
    runs = {
        "first_half": ("--max-batches", "3"),
        "no_sanity_pass": ("--max-batches", "6", "--set", "hyperparameters.sanity_pass=false"),
    }
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = {
            name: pool.submit(run, folder / name, synthetic_cache, 2, *args, config=TOY)
            for name, args in runs.items()
        }
        return {name: (folder / name, future.result()) for name, future in futures.items()}


def records_of(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_share_the_global_batch_and_evaluate_each_image_once(two_ranks: Path) -> None:
    records = records_of(two_ranks)
    assert sorted(losses(records)) == list(range(1, 7))
    assert all(math.isfinite(loss) for loss in losses(records).values())
    (validation,) = [r["metrics"] for r in records if r["kind"] == "validation"]
    # 7 images over 2 ranks in batches the ranks share unevenly: each counted exactly once.
    assert validation["num_images"] == DATA["num_val"]
    stats = [k for k in validation if k.startswith("bbox_") and "per_class" not in k]
    assert len([k for k in stats if "best_F1" not in k]) == 12
    assert sorted(k for k in stats if "best_F1" in k) == [
        "bbox_best_F1", "bbox_best_F1_precision", "bbox_best_F1_recall", "bbox_best_F1_score_thr"
    ]  # fmt: skip
    assert len([k for k in validation if k.startswith("bbox_AP_per_class/")]) == 3
    (checkpoint,) = (two_ranks / "determined").iterdir()
    assert (checkpoint / "state_dict.pth").is_file()


def test_a_streamed_validation_on_two_ranks_equals_the_gathered_one(
    tmp_path: Path, synthetic_cache: Path, two_ranks: Path
) -> None:
    """`streamed_evaluation: true`: each rank matches its own images as it predicts them and the
    chief merges the ranks' states; the same run's metrics as when the chief gathers every
    detection (7 images dealt to 2 ranks in uneven batches)."""
    sets = ("--set", "hyperparameters.streamed_evaluation=true")
    streamed = run(tmp_path, synthetic_cache, 2, "--max-batches", "6", *sets, config=TOY)
    assert losses(streamed) == losses(records_of(two_ranks))  # the same run up to there
    (gathered,) = [r["metrics"] for r in records_of(two_ranks) if r["kind"] == "validation"]
    (got,) = [r["metrics"] for r in streamed if r["kind"] == "validation"]
    assert got["num_images"] == DATA["num_val"]
    assert 0.1 < gathered["bbox_mAP"] < 0.9  # real numbers to compare, not zeros
    keys = [k for k in gathered if k.startswith("bbox_")]
    assert len(keys) == 12 + 4 + 3  # the statistics, the best F1's, the per-class AP
    assert {k: got[k] for k in keys} == {k: gathered[k] for k in keys}
    # The report says what a streamed evaluation leaves out; the gathered one has it all.
    for output, streamed_run in ((tmp_path, True), (two_ranks, False)):
        (checkpoint,) = (output / "determined").iterdir()
        report = json.loads((checkpoint / "evaluation" / "report.json").read_text())
        assert ("not_computed" in report) is streamed_run, output
        assert ("tide" in report["tasks"]["bbox"]) is not streamed_run, output


def test_two_local_runs_on_one_host_keep_apart(side_by_side: dict) -> None:
    """Determined's IPC ports are picked per run: two 2-rank runs at once both complete."""
    trained = {
        name: [r["batches"] for r in records if r["kind"] == "training"]
        for name, (_, records) in side_by_side.items()
    }
    assert trained == {"first_half": [1, 2, 3], "no_sanity_pass": [1, 2, 3, 4, 5, 6]}


def test_resume_continues_exactly_on_two_ranks(
    tmp_path: Path, synthetic_cache: Path, two_ranks: Path, side_by_side: dict
) -> None:
    """The first half's checkpoint resumed to batch 6 gives the shared run's losses. One rank's
    exact resume is tests/on_determined/test_trial.py's (the same code path in this process)."""
    first_half, _ = side_by_side["first_half"]
    (checkpoint,) = (first_half / "determined").iterdir()
    resumed = run(
        tmp_path, synthetic_cache, 2, "--max-batches", "6", "--resume", str(checkpoint), config=TOY
    )
    expected = {b: loss for b, loss in losses(records_of(two_ranks)).items() if b > 3}
    assert sorted(losses(resumed)) == [4, 5, 6]  # across the epoch's end (4 batches an epoch)
    assert losses(resumed) == pytest.approx(expected, rel=1e-6)


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    (checkpoint,) = (output / "determined").iterdir()
    state = torch.load(checkpoint / "state_dict.pth", map_location="cpu", weights_only=False)
    # The distributed run saves the DDP wrapper's state: its keys carry "module.".
    return {k.removeprefix("module."): v for k, v in state["models_state_dict"][0].items()}


def test_the_sanity_pass_leaves_no_trace_on_two_ranks(two_ranks: Path, side_by_side: dict) -> None:
    """A 2-rank run without the start-up sanity pass: the same losses, metrics and weights, bit
    for bit, as the shared run with it."""
    output, records = side_by_side["no_sanity_pass"]
    assert records == records_of(two_ranks)
    without, with_pass = final_weights(output), final_weights(two_ranks)
    assert without.keys() == with_pass.keys()
    assert all(torch.equal(without[name], with_pass[name]) for name in without)


def test_two_ranks_of_two_train_like_one_rank_of_four(
    tmp_path: Path, synthetic_cache: Path, two_ranks: Path
) -> None:
    """Gradient sync: same global batches, same losses, same parameters (toy per-image loss)."""
    one = run(tmp_path / "one", synthetic_cache, 1, "--max-batches", "6", config=TOY)
    two = records_of(two_ranks)
    assert len(set(losses(one).values())) == 6  # training moves
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    w1, w2 = final_weights(tmp_path / "one"), final_weights(two_ranks)
    assert w1.keys() == w2.keys() and len(w1) == 4
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-7, msg=name)
    (val1,) = [r["metrics"] for r in one if r["kind"] == "validation"]
    (val2,) = [r["metrics"] for r in two if r["kind"] == "validation"]
    assert val1["num_images"] == val2["num_images"] == DATA["num_val"]
    assert 0.1 < val1["bbox_mAP"] < 0.9  # real numbers to compare, not zeros
    assert {k: v for k, v in val2.items() if k.startswith("bbox_")} == {
        k: v for k, v in val1.items() if k.startswith("bbox_")
    }


def test_accumulating_two_batches_of_two_equals_one_batch_of_four(
    tmp_path: Path, synthetic_cache: Path
) -> None:
    """optim_wrapper.accumulative_counts maps onto Determined's aggregation frequency."""
    constant = tmp_path / "constant_lr.py"
    constant.write_text("param_scheduler = []\n")
    accumulate = tmp_path / "accumulate.py"
    accumulate.write_text("param_scheduler = []\noptim_wrapper = dict(accumulative_counts=2)\n")
    args = ["--set", "hyperparameters.global_batch_size=4", "--max-batches", "2"]
    large = run(tmp_path / "large", synthetic_cache, 1, *args, "--set",
                f"hyperparameters.merge_config={constant}", config=TOY)  # fmt: skip
    args = ["--set", "hyperparameters.global_batch_size=2", "--max-batches", "4"]
    small = run(tmp_path / "small", synthetic_cache, 1, *args, "--set",
                f"hyperparameters.merge_config={accumulate}", config=TOY)  # fmt: skip
    assert len(losses(large)) == 2 and len(losses(small)) == 4
    w_large, w_small = final_weights(tmp_path / "large"), final_weights(tmp_path / "small")
    for name in w_large:
        torch.testing.assert_close(w_small[name], w_large[name], rtol=1e-5, atol=1e-7, msg=name)
