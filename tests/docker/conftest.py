"""Every test under tests/docker needs the docker engine and is marked ``docker``."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/docker/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.docker)
