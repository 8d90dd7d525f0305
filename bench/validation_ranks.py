"""The end of a validation on each of N ranks, one spawned process per rank (bench.validation).

Each process loads its rank's part (pickled by bench.validation's update phase) and does what
the validation's end does on that side; the chief also evaluates. Ours: our trial's
`EvaluatorReducer` in Determined's own reducer context, over Determined's `DistributedContext`
(its ZMQ allgather on loopback). mmdet's: `CocoMetric.evaluate` over torch.distributed (gloo),
which collects the parts as mmengine does by default (pickles in a shared folder, loaded by
rank 0). Each process reports its time, its peak resident memory and, on the chief, the 12
COCO statistics unrounded.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import queue as queue_module
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.coco_val_data import CLASSES

STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")
STAT_NAMES += ("AR@100", "AR@300", "AR@1000", "AR_s@1000", "AR_m@1000", "AR_l@1000")


def evaluator_cfg(ann_file: str, metric: str) -> Any:
    from mmengine.config import Config

    return Config({"val_evaluator": {"type": "CocoMetric", "ann_file": ann_file,
                                     "metric": metric}})  # fmt: skip


def peak_mb() -> float:
    """This process's peak resident memory: the kernel's high-water mark of its address space
    (getrusage's maxrss would report the parent's, which a spawned child inherits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM (not Linux?).")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(function: Callable[..., Any]) -> tuple[Callable[..., Any], list[float]]:
    """`function` wrapped to append the seconds of each call to the list returned with it."""
    seconds: list[float] = []

    def wrapper(*args: Any) -> Any:
        begin = time.perf_counter()
        result = function(*args)
        seconds.append(time.perf_counter() - begin)
        return result

    return wrapper, seconds


def rank_end(job: dict[str, Any], rank: int, queue: Any) -> None:
    """One rank's end of validation (a spawned process): gather, and compute on the chief."""
    import warnings

    warnings.filterwarnings("ignore")
    share = pickle.loads((Path(job["parts"]) / f"{job['side']}-{rank}.pkl").read_bytes())
    result: dict[str, Any] = {"rank": rank}
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        if job["side"] == "ours":
            result.update(ours_end(job, rank, share))
        else:
            result.update(mmdet_end(job, rank, share))
    result["peak_mb"] = peak_mb()
    queue.put(result)


def ours_end(job: dict[str, Any], rank: int, share: Any) -> dict[str, Any]:
    import determined as det
    from determined.pytorch._reducer import _PyTorchReducerContext

    from on_determined.steps import EvaluatorReducer
    from utils.evaluation.evaluator import CocoEvaluator
    from utils.training.loop import ValidationPass

    ranks = job["ranks"]
    dist = det.core.DistributedContext(
        rank=rank, size=ranks, local_rank=rank, local_size=ranks, cross_rank=0, cross_size=1,
        pub_port=job["ports"][0], pull_port=job["ports"][1],
    )  # fmt: skip
    evaluator = CocoEvaluator(
        evaluator_cfg(job["ann_file"], job["metric"]), "hotcoco", meta={"classes": CLASSES}
    )
    context = _PyTorchReducerContext(dist.allgather)  # what PyTorchTrialContext builds on
    # The pass's end alone: its share and result read only the session's evaluator.
    validation = ValidationPass(SimpleNamespace(evaluator=evaluator))
    validation.rank.evaluator.entries, validation.rank.failures, _ = share
    reducer = context.wrap_reducer(EvaluatorReducer(validation, chief=rank == 0),
                                   for_training=False)  # fmt: skip
    # The chief's evaluation alone, without the gather.
    reducer.cross_slot_reduce, combined = timed(reducer.cross_slot_reduce)
    dist.allgather(None)  # all ranks start together
    before = peak_mb()
    begin = time.perf_counter()
    metrics = context.reduce_metrics(for_training=False)
    seconds = time.perf_counter() - begin
    dist.close()
    # As flatten_metrics names them: bbox_AR_100, ...
    names = [f"{job['metric']}_{name.replace('@', '_')}" for name in STAT_NAMES]
    stats = [metrics[name] for name in names] if rank == 0 else None
    return {"seconds": seconds, "peak_before_mb": before, "stats": stats, "evaluate": combined[0]}


def mmdet_end(job: dict[str, Any], rank: int, share: Any) -> dict[str, Any]:
    import torch.distributed
    from mmdet.evaluation import CocoMetric
    from pycocotools.cocoeval import COCOeval

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{job['ports'][0]}", rank=rank,
        world_size=job["ranks"],
    )  # fmt: skip
    metric = CocoMetric(ann_file=job["ann_file"], metric=job["metric"])
    metric.dataset_meta = {"classes": CLASSES}
    metric.results = share
    # mmdet rounds its metrics to 3 digits: the statistics are read where pycocotools makes them.
    stats: list[list[float]] = []
    summarize = COCOeval.summarize

    def recorded(self: COCOeval) -> None:
        summarize(self)
        stats.append([float(value) for value in self.stats])

    COCOeval.summarize = recorded
    metric.compute_metrics, evaluated = timed(metric.compute_metrics)
    torch.distributed.barrier()
    before = peak_mb()
    begin = time.perf_counter()
    metric.evaluate(job["size"])
    seconds = time.perf_counter() - begin
    torch.distributed.destroy_process_group()
    chief = rank == 0
    return {"seconds": seconds, "peak_before_mb": before, "stats": stats[0] if chief else None,
            "evaluate": evaluated[0] if chief else None}  # fmt: skip


def end_ranks(side: str, ranks: int, **job: Any) -> dict[str, Any]:
    """`ranks` processes ending the validation on `side`; the chief's and the workers' figures."""
    job.update(side=side, ranks=ranks, ports=(free_port(), free_port()))
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=rank_end, args=(job, r, queue)) for r in range(ranks)]
    for process in processes:
        process.start()
    results: list[dict[str, Any]] = []
    while len(results) < ranks:
        try:
            results.append(queue.get(timeout=5))
        except queue_module.Empty:
            failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            lost = all(p.exitcode is not None for p in processes) and queue.empty()
            if failed or lost:
                for process in processes:
                    process.kill()
                raise RuntimeError(f"{side} ranks ended without their results: {failed}") from None
    for process in processes:
        process.join()
    results.sort(key=lambda r: r["rank"])
    chief = results[0]
    return {
        "compute": chief["seconds"],
        "evaluate": chief["evaluate"],
        "peak_mb": chief["peak_mb"],
        "peak_before_mb": chief["peak_before_mb"],
        "worker_peak_mb": max(r["peak_mb"] for r in results[1:]),
        "stats": chief["stats"],
    }
