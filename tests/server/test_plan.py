"""The federation's target geometry (server.plan): a site's voxel-size report is checked before it counts."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from server.plan import reported_spacing


def _reply(**metrics) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(metrics)})


def test_a_site_report_is_checked_before_it_counts():
    good = {"num-examples": 12, "spacing-0": 1.0, "spacing-1": 1.0, "spacing-2": 1.5}
    assert reported_spacing(_reply(**good), max_examples=100) == ((1.0, 1.0, 1.5), 12)
    for bad in (
        good | {"spacing-2": float("nan")},
        good | {"spacing-0": 0.0},
        good | {"spacing-1": 1e9},
        good | {"num-examples": 0},
        good | {"num-examples": 10**6},
        good | {"extra": 1.0},
        {k: v for k, v in good.items() if k != "spacing-2"},
    ):
        with pytest.raises(ValueError):
            reported_spacing(_reply(**bad), max_examples=100)
    with pytest.raises(ValueError):
        reported_spacing(RecordDict({"config": ConfigRecord({"x": 1})}), max_examples=100)
    many = good | {"num-examples": list(range(100_000))}  # a whole list, which the warning must not print
    with pytest.raises(ValueError, match=r"^num-examples of type list is not a case count in 1\.\.100$"):
        reported_spacing(_reply(**many), max_examples=100)
