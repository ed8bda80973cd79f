"""Shared fixtures (the helpers they use live in :mod:`tests.helpers`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

from tests.helpers import write_case, write_partitions


@pytest.fixture(autouse=True)
def private_home(tmp_path_factory, monkeypatch) -> Path:
    """Every test's own ``$MSTKD_HOME``: a deployed node keeps its state there when its node config names no
    ``state-dir`` (it never takes a folder from the run config), and nothing may land in the user's ~/.mstkd."""
    home = tmp_path_factory.mktemp("mstkd-home")
    monkeypatch.setenv("MSTKD_HOME", str(home))
    return home


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Ten FeTS-layout cases over two sites (6 + 4) with ``partitioning.csv``."""
    root = tmp_path / "data"
    ids = [f"FeTS2022_{i:05d}" for i in range(1, 11)]
    for i, case_id in enumerate(ids):
        write_case(root, case_id, seed=i)
    write_partitions(root / "partitioning.csv", {"1": ids[:6], "2": ids[6:]})
    return root


@pytest.fixture
def task_identity(monkeypatch):
    """What Flower sets in a process before it makes messages."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Whole-system tests (a ServerApp with ClientApps, ``flwr run``, a deployment, a benchmark) belong to the slow
    tier: ``pytest -m "not slow"`` runs each package's own tests in a few minutes; CI runs everything."""
    for item in items:
        if item.path.is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.slow)
