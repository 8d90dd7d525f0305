"""Connecting to Ray and checking what it has, before any worker starts."""

from __future__ import annotations

import os
import socket
from typing import Any

import ray

from utils.base.errors import USER_ERRORS, ExperimentError
from utils.config.build import REPO_ROOT

# A local Ray on a small machine: the object store holds only checkpoints' small messages.
LOCAL_OBJECT_STORE = 200 * 1024 * 1024
# Passed on to every worker when set where the driver runs.
FORWARDED = ("MMDET_DETERMINED_INIT_LOG", "XDG_CACHE_HOME", "MLFLOW_TRACKING_URI")
# Ray Train's print patch sends a worker's print() to Train's logger, and also to print itself
# whenever sys.stdout is not sys.__stdout__, which on a Ray worker it never is (Ray points it at
# the worker's log file): every printed line (progress, COCO tables) reached the console twice.
PRINT_PATCH = "RAY_TRAIN_ENABLE_PRINT_PATCH"
# What a Tune trial reserves when its workers train in a `TorchTrainer` of its own: its process
# only waits on Ray Train's controller (itself 0 CPUs), so no CPU, which the workers get; Tune
# takes no empty request, so it reserves about the memory it holds (0.9 GB: torch, mmdet, plan).
TRIAL_DRIVER = {"CPU": 0, "memory": 1024**3}


def runtime_env() -> dict[str, Any]:
    """What every process of our Ray jobs starts with: RAY_ADDRESS set to its own cluster.

    Ray Train's placement-group cleaner (a worker process) finds its cluster through the state
    API, which without RAY_ADDRESS looks for every Ray on the host and gives up when it finds two
    (a second local Ray, or a test's): the cleaner then stops, and the next trial of several
    workers waits for good for the CPUs of the last. The hook is a nested function, so that Ray
    ships it by value: a worker runs it before it can import this checkout."""

    def pin_ray_address() -> None:
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)

    return {"worker_process_setup_hook": pin_ray_address}


def connect(address: str | None) -> None:
    """`ray.init`: the cluster at `address` (`auto`: the one `ray start` made on this host), or
    a local Ray of this machine. A Ray already started in this process is kept."""
    if ray.is_initialized():
        return
    options: dict[str, Any] = {"log_to_driver": True, "logging_level": "WARNING"}
    if address:
        # The nodes of a cluster get this checkout (not its virtualenv or runs) as their code.
        options["runtime_env"] = {
            **runtime_env(),
            "working_dir": str(REPO_ROOT),
            "excludes": [".venv", "runs", ".git", "*.pth"],
        }
        try:
            reachable(address)  # Ray itself retries an unreachable address for minutes
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError, OSError) as err:
            raise ExperimentError(
                f"--address {address}: no Ray cluster can be reached there ({err}). Start one "
                "with `ray start --head` (then --address auto on its nodes, or its "
                "HOST:6379), or leave --address out to start a local Ray."
            ) from err
        return
    # With its dashboard: Ray Train's placement-group cleaner asks the dashboard's state API
    # whether a Tune trial's trainer is still alive, and without it the workers' resources of a
    # trial that ASHA stops are never freed (the next multi-worker trial waits for good).
    ray.init(
        include_dashboard=True,
        object_store_memory=LOCAL_OBJECT_STORE,
        runtime_env=runtime_env(),
        **options,
    )


def reachable(address: str, timeout: float = 10.0) -> None:
    """Raise OSError unless `HOST:PORT` (or `ray://HOST:PORT`) accepts a TCP connection; `auto`
    is left to Ray, which fails at once when this host runs no Ray."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError("write it as HOST:PORT (the head's GCS port, 6379 by default) or auto")
    with socket.create_connection((host, int(port)), timeout=timeout):
        pass


def check_workers(count: int, what: str) -> bool:
    """Whether the workers take GPUs (one each, when the cluster has any); an error saying what
    Ray sees when `count` workers do not fit."""
    if count < 1:
        raise ExperimentError(f"{what} is {count}: use 1 or more workers.")
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    use_gpu = gpus > 0
    have = gpus if use_gpu else cpus
    if count > have:
        unit = "GPU" if use_gpu else "CPU"
        raise ExperimentError(
            f"{what} is {count}, but Ray sees {cpus} CPUs and {gpus} GPUs in the cluster; each "
            f"worker takes one {unit}: use at most {have} workers, or add nodes to the cluster."
        )
    return use_gpu


def trial_resources(
    workers: int, use_gpu: bool, wanted: int
) -> tuple[int, dict[str, float] | None, dict[str, float]]:
    """For Tune: how many trials run at once, as many as the cluster holds (at most `wanted`;
    Ray's advice for Train inside Tune: a trial started beyond that waits for its workers); what
    each of their workers reserves (`worker_resources`, the CPUs shared by all at once); what a
    trial reserves: its one worker, trained in its own process, or `TRIAL_DRIVER`."""
    have = int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 0))
    at_once = max(1, min(wanted, have // workers))
    per_worker = worker_resources(workers, use_gpu, at_once)
    if workers > 1:
        return at_once, per_worker, TRIAL_DRIVER
    return at_once, per_worker, per_worker or {"CPU": 1, "GPU": 1}


def worker_resources(count: int, use_gpu: bool, runs: int = 1) -> dict[str, float] | None:
    """What each of `count` workers of `runs` runs at once reserves: on CPUs, an equal share of
    the cluster's (Ray gives a worker 1 CPU by default and sets its OMP_NUM_THREADS, torch's
    threads, to that: a single worker on a 2-core machine trained 1.3-1.5x slower per batch than
    Determined's local run); None on GPUs (Ray's default: one GPU and one CPU each)."""
    if use_gpu:
        return None
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return {"CPU": max(1, cpus // (count * runs))}


def worker_env() -> dict[str, str]:
    """The driver's settings a worker must share (cache root, MLflow server, init log), and Ray
    Train's print patch off (`PRINT_PATCH`) unless the driver's environment sets it."""
    forwarded = {name: os.environ[name] for name in FORWARDED if name in os.environ}
    return {PRINT_PATCH: os.environ.get(PRINT_PATCH, "0"), **forwarded}


def raise_user_error(err: BaseException) -> None:
    """Raise the first user error (bad data, a stopped run) behind a failed Ray run, so the
    command ends with its one-line message; return if there is none."""
    seen: set[int] = set()
    pending = [err]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, USER_ERRORS):
            raise current from None
        pending += list(getattr(current, "worker_failures", {}).values())
        pending += [getattr(current, "cause", None), current.__cause__, current.__context__]
        pending.append(getattr(current, "controller_failure", None))
