"""`python -m on_ray serve`: a checkpoint behind a batched HTTP API on Ray Serve.

One deployment, the FastAPI app of `on_ray/serve_http.py` behind `@serve.ingress`, answers
every route; its replicas each load the export and gather concurrent images with `@serve.batch`
(`utils/inference/serving.py` runs them). On the CPU the replicas share the local Ray's CPUs;
where Ray sees GPUs, each replica takes one. Metrics: `on_ray/serve_metrics.py`.
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

from on_ray.checkpoints import ray_checkpoint
from on_ray.cluster import LOCAL_OBJECT_STORE
from on_ray.serve_http import Service, Settings, app, service
from on_ray.serve_metrics import ReplicaMetrics, RequestMetrics
from utils.base.errors import PredictError
from utils.inference.predict import find_export
from utils.inference.serving import Outcome, Request, ServingModel

APP_NAME = "detector"


def this_replica() -> Service:
    return serve.get_replica_context().servable_object


# Before `serve.ingress`, which freezes the app as it is.
app.dependency_overrides[service] = this_replica
app.add_middleware(RequestMetrics)


@serve.deployment(name=APP_NAME)
@serve.ingress(app)
class Detector:
    """A replica: the model, answering the app's routes."""

    def __init__(self, export_dir: str, settings: Settings) -> None:
        device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = ServingModel(export_dir, device, settings.shape_batches)
        self.settings = settings
        self.metrics = ReplicaMetrics(settings.max_batch_size)
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
        self.metrics.batch_started(requests)
        # In that thread: the replica keeps accepting requests (the next batch) meanwhile.
        loop = asyncio.get_running_loop()
        outcomes = await loop.run_in_executor(self.executor, self.model.detect, requests)
        self.metrics.batch_done(outcomes)
        return outcomes


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
    metrics_port: int | None = None,
) -> str:
    """Start a local Ray (unless this process has one) and Serve, deploy; returns the URL.
    Ray exports the metrics on `metrics_port` (default: a free port it picks)."""
    export_dir = find_export(ray_checkpoint(checkpoint))
    if not ray.is_initialized():
        ray.init(
            num_cpus=num_cpus,
            _metrics_export_port=metrics_port,
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


def metrics_url() -> str:
    """Where this node's Ray exports its metrics (Serve's and ours), in Prometheus text."""
    port = next(node["MetricsExportPort"] for node in ray.nodes() if node["Alive"])
    return f"http://127.0.0.1:{port}/metrics"


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
        # After ray.init, which sets its own. SIGINT too: a server started in the background
        # of a shell inherits SIGINT ignored, and Ctrl-C (or a test's) would not stop it.
        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, interrupt)
        print(f"Serving {checkpoint} at {url} (page), {url}v1/detect (API). Ctrl-C stops.")
        print(f"API docs at {url}docs; metrics (Prometheus text) at {metrics_url()}")
        print(f"Try: curl -F image=@photo.jpg {url}v1/detect", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("Stopping.", flush=True)
    finally:
        if ray.is_initialized():
            stop()
    print("Stopped.", flush=True)
