"""The Ray modules' local cluster."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


def init_local_ray(num_cpus: int, include_dashboard: bool = False) -> None:
    """`ray.init` of a local Ray as the tests want it: `num_cpus`, a small object store, and the
    runtime environment of on_ray's own clusters (on_ray.cluster.runtime_env)."""
    import ray

    from on_ray import cluster

    ray.init(
        num_cpus=num_cpus,
        include_dashboard=include_dashboard,
        runtime_env=cluster.runtime_env(),
        object_store_memory=100 * 1024 * 1024,
        logging_level="WARNING",
    )


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray of 2 CPUs, once per module that asks for it (a module may define its own, as
    test_tune_workers does)."""
    import ray

    init_local_ray(2)
    yield
    ray.shutdown()
