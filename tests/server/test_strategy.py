"""The aggregation strategy (server.strategy): robust settings that cannot work are refused before any work."""

from __future__ import annotations

import pytest

from mstkd.errors import InputError
from mstkd.runconfig import RunConfig


def test_impossible_robust_settings_are_refused_before_any_work():
    from server.strategy import strategy_options

    with pytest.raises(InputError, match="needs at least 7 nodes per round"):
        strategy_options(RunConfig.parse({"strategy": "bulyan", "malicious-nodes": 1}), 4)
    with pytest.raises(InputError, match="trims no reply"):
        strategy_options(RunConfig.parse({"strategy": "fedtrimmedavg", "trim-beta": 0.2}), 4)
    assert strategy_options(RunConfig.parse({"strategy": "multikrum", "malicious-nodes": 1}), 4) == {
        "num_malicious_nodes": 1,
        "num_nodes_to_select": 3,
    }
