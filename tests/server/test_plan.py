"""The federation's target geometry (server.plan): a site's voxel-size report is checked before it counts."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from omegaconf import OmegaConf

from server.plan import agree_target, reported_spacing
from tests.helpers import InProcGrid


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


def test_a_site_that_claims_every_case_has_one_vote_like_the_others():
    """Site 1 reports 9 mm voxels and the most cases a reply may claim; sites 2-4 report theirs honestly. A median
    weighted by the claimed counts would be site 1's 9 mm; one vote per site gives the honest sites' value."""
    reports = {
        1: {"num-examples": 10_000, "spacing-0": 9.0, "spacing-1": 9.0, "spacing-2": 9.0},
        2: {"num-examples": 12, "spacing-0": 1.0, "spacing-1": 1.0, "spacing-2": 1.0},
        3: {"num-examples": 30, "spacing-0": 1.0, "spacing-1": 1.0, "spacing-2": 1.5},
        4: {"num-examples": 8, "spacing-0": 1.2, "spacing-1": 1.2, "spacing-2": 3.0},
    }

    def site(message: Message, context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord(reports[context.node_id])}), reply_to=message)

    grid = InProcGrid(site, {}, [{}] * len(reports))
    said: list[str] = []
    data = OmegaConf.create({"target_spacing": None, "orientation": "LPS"})
    target = agree_target(grid, data, min_nodes=4, node_wait=0, timeout=5, max_examples=10_000, say=said.append)
    assert target.spacing == (1.1, 1.1, 2.25) and target.orientation == "LPS"
    assert said == [
        "target geometry 1.1 x 1.1 x 2.25 mm LPS: the median of 4 sites' median voxel sizes (9 x 9 x 9 of 10000 "
        "cases, 1 x 1 x 1 of 12 cases, 1 x 1 x 1.5 of 30 cases, 1.2 x 1.2 x 3 of 8 cases)"
    ]


def test_a_resumed_run_keeps_its_geometry_and_a_run_config_that_sets_another_is_refused(tmp_path):
    """The nodes take only the geometry a run config sets (a plan a site approved), so a resumed run config that sets
    another than the run trained at would have every node refuse every round: it is refused at start instead."""
    from mstkd.errors import InputError
    from server.runfolder import original_target

    OmegaConf.save({"data": {"target_spacing": [1.0, 1.0, 2.0], "orientation": "LPS"}}, tmp_path / "config.yaml")
    unset = OmegaConf.create({"target_spacing": None, "orientation": "RAS"})
    assert original_target(tmp_path, unset).describe() == "1 x 1 x 2 mm LPS"
    same = OmegaConf.create({"target_spacing": [1, 1, 2], "orientation": "LPS"})
    assert original_target(tmp_path, same).describe() == "1 x 1 x 2 mm LPS"
    for spacing, orientation in (([1, 1, 1], "LPS"), ([1, 1, 2], "RAS")):
        other = OmegaConf.create({"target_spacing": spacing, "orientation": orientation})
        with pytest.raises(InputError, match="resume-from: the run trained at 1 x 1 x 2 mm LPS, and the run config"):
            original_target(tmp_path, other)
    with pytest.raises(InputError, match="config.yaml does not read"):
        original_target(tmp_path / "missing", same)
