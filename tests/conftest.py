from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.books import Books, write_catalog
from tests.browser import Tab, open_tab
from tests.procs import Cluster


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Unit tests first: the fastest feedback comes first.
    order = {"unit": 0, "integration": 1, "e2e": 2, "chaos": 3}
    items.sort(
        key=lambda item: next((v for k, v in order.items() if f"/{k}/" in str(item.path)), 9)
    )


CAPACITIES = {
    "flight": {"F50": 50, "F50-SAGA": 50, "FX": 200},
    "hotel": {"H": 1000},
    "car": {"C": 1000, "C-SOLD-OUT": 0},
}


def open_books(cluster: Cluster) -> Books:
    assert cluster.coordinator is not None
    return Books.open(
        cluster.coordinator.address, {k: p.address for k, p in cluster.services.items()}
    )


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., tuple[Cluster, Books]]]:
    """Start a cluster with the test catalog; everything is stopped at teardown."""
    started: list[tuple[Cluster, Books]] = []

    def start(**kwargs: object) -> tuple[Cluster, Books]:
        catalog = write_catalog(tmp_path / "catalog", CAPACITIES)
        cluster = Cluster(tmp_path / f"data{len(started)}", catalog=catalog, **kwargs).start()
        books = open_books(cluster)
        started.append((cluster, books))
        return cluster, books

    yield start
    for cluster, books in started:
        books.close()
        cluster.stop()


@pytest.fixture
def tab() -> Iterator[Tab]:
    """A tab of a real headless Chromium (tests.browser)."""
    with open_tab() as found:
        yield found
