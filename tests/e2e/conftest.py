"""Fixtures of the tests that start processes: clusters of the real broker, gateway and workers
(tests/support/cluster.py), each stopped after the test, or after the module, that made it.

``make_cluster(**settings)`` makes a Cluster in the test's tmp_path and starts nothing: the test
starts what it needs (``cluster.start_all(workers)`` for the usual broker, gateway and workers).
``make_module_cluster`` is the same for a cluster that a module's tests share, each in a fresh
folder. A module with its own ``cluster`` fixture builds it on one of these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.support.cluster import Cluster


def _clusters_stopped_at_the_end(folder: Callable[[], Path]) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(**settings: str) -> Cluster:
        made.append(Cluster(folder(), **settings))
        return made[-1]

    try:
        yield make
    finally:
        for cluster in made:
            cluster.stop()


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    yield from _clusters_stopped_at_the_end(lambda: tmp_path)


@pytest.fixture(scope="module")
def make_module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Cluster]]:
    yield from _clusters_stopped_at_the_end(lambda: tmp_path_factory.mktemp("cluster"))
