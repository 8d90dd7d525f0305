"""`python -m on_ray serve`: a checkpoint behind a batched HTTP API on Ray Serve.

One deployment answers every route (`on_ray/serve_http.py`); its replicas each load the export
and gather concurrent detect requests with `@serve.batch` (`utils/inference/serving.py` runs them:
one forward pass per padded shape). On the CPU the replicas share the local Ray's CPUs; where
Ray sees GPUs, each replica takes one.
"""

from __future__ import annotations

import asyncio
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
import torch
from ray import serve
from starlette.requests import Request as HttpRequest
from starlette.responses import Response

from on_ray.checkpoints import ray_checkpoint
from on_ray.cluster import LOCAL_OBJECT_STORE
from on_ray.serve_http import Settings, handle
from utils.base.errors import PredictError
from utils.inference.predict import find_export
from utils.inference.serving import Outcome, Request, ServingModel

APP_NAME = "detector"


@serve.deployment(name=APP_NAME)
class Detector:
    """A replica: the model, and every HTTP route."""

    def __init__(self, export_dir: str, settings: Settings) -> None:
        device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = ServingModel(export_dir, device)
        self.settings = settings
        self.detect_batch.set_max_batch_size(settings.max_batch_size)
        self.detect_batch.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)
        # Forward passes in one thread of their own, always the same: each thread that calls
        # torch gets its own OpenMP team, and idle teams spin on the CPUs the busy one needs
        # (on 2 cores, asyncio.to_thread's pool answered about 10 % slower).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")

    def describe(self) -> dict[str, Any]:
        return self.model.describe()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # reset from the settings
    async def detect_batch(self, requests: list[Request]) -> list[Outcome]:
        # In that thread: the replica keeps accepting requests (the next batch) meanwhile.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.model.detect, requests)

    async def __call__(self, request: HttpRequest) -> Response:
        return await handle(request, self)


def application(
    export_dir: Path,
    settings: Settings,
    replicas: int = 1,
    autoscale: tuple[int, int] | None = None,
) -> serve.Application:
    """The Serve application: `replicas` replicas, or `autoscale` (min, max) by load."""
    most = autoscale[1] if autoscale else replicas
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    on_gpu = gpus > 0 and not (settings.device or "").startswith("cpu")
    if (settings.device or "").startswith("cuda") and not gpus:
        raise PredictError(f"--device {settings.device}: Ray sees no GPU; use --device cpu.")
    have, what = (gpus, "GPUs") if on_gpu else (cpus, "CPUs")
    if most > have:
        raise PredictError(
            f"{most} replicas need {most} {what}, one each, and Ray sees {have}: ask for at most "
            f"{have} (--replicas, or the maximum of --autoscale)."
        )
    # On the CPU a replica's torch uses the CPUs it holds (Ray sets OMP_NUM_THREADS to them).
    actor = {"num_gpus": 1, "num_cpus": 1} if on_gpu else {"num_cpus": max(1, cpus // most)}
    options: dict[str, Any] = {
        "ray_actor_options": actor,
        # Two batches per replica: one in its forward pass while the next one gathers.
        "max_ongoing_requests": 2 * settings.max_batch_size,
    }
    if autoscale:
        options["autoscaling_config"] = {
            "min_replicas": autoscale[0],
            "max_replicas": autoscale[1],
            "target_ongoing_requests": settings.max_batch_size,
        }
    else:
        options["num_replicas"] = replicas
    return Detector.options(**options).bind(str(export_dir), settings)


def start(
    checkpoint: str,
    settings: Settings,
    replicas: int = 1,
    autoscale: tuple[int, int] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_cpus: int | None = None,
) -> str:
    """Start a local Ray (unless this process has one) and Serve, deploy; returns the URL."""
    export_dir = find_export(ray_checkpoint(checkpoint))
    if not ray.is_initialized():
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE,
            logging_level="WARNING",
            # Ray lowers its workers' priority (nice 15); a replica answering requests should
            # not wait behind every other process of the machine.
            _system_config={"worker_niceness": 0},
        )
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(export_dir, settings, replicas, autoscale), name=APP_NAME)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}/"


def stop() -> None:
    """Shut Serve and the local Ray down."""
    serve.shutdown()
    ray.shutdown()


def run(checkpoint: str, settings: Settings, **kwargs: Any) -> None:
    """Serve until Ctrl-C (or SIGTERM), then stop cleanly."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        url = start(checkpoint, settings, **kwargs)
        signal.signal(signal.SIGTERM, interrupt)  # after ray.init, which sets its own
        print(f"Serving {checkpoint} at {url} (page), {url}v1/detect (API). Ctrl-C stops.")
        print(f"Try: curl -F image=@photo.jpg {url}v1/detect", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("Stopping.", flush=True)
    finally:
        if ray.is_initialized():
            stop()
    print("Stopped.", flush=True)
