from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Unit tests first: the fastest feedback comes first.
    order = {"unit": 0, "integration": 1, "e2e": 2, "chaos": 3}
    items.sort(key=lambda item: next((v for k, v in order.items() if f"/{k}/" in str(item.path)), 9))
