"""The benchmark driver (simulations.bench): a run with a skipped round or a failed site is not a result."""

from __future__ import annotations

import json

import pytest

from simulations import bench


def test_a_run_with_a_skipped_round_or_a_failed_site_is_not_a_result(tmp_path):
    log = tmp_path / "metrics.jsonl"
    good = [{"round": r, "failures": []} for r in range(3)]
    log.write_text("".join(json.dumps(r) + "\n" for r in good))
    bench.incomplete_rounds(log)  # every site in every round: accepted
    failed = {"round": 2, "failures": [{"stage": "train", "node": 7, "reason": "OutOfMemoryError: worker killed"}]}
    log.write_text("".join(json.dumps(r) + "\n" for r in [*good[:2], failed]))
    with pytest.raises(RuntimeError, match="round 2 did not run on every site.*OutOfMemoryError"):
        bench.incomplete_rounds(log)
    log.write_text(json.dumps({"round": 1, "failures": [], "skipped": "0 of 4 nodes replied"}) + "\n")
    with pytest.raises(RuntimeError, match="round 1 did not run on every site"):
        bench.incomplete_rounds(log)
