"""The Ray modules' local cluster."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray of 2 CPUs and a small object store, once per module that asks for it (a
    module may define its own, as test_tune_workers does)."""
    import ray

    from on_ray import cluster

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env=cluster.runtime_env(),  # as on_ray's own: see there
        object_store_memory=100 * 1024 * 1024,
        logging_level="WARNING",
    )
    yield
    ray.shutdown()
