"""What the server keeps between rounds (server.state): the strategy's state, arrays and JSON, never a pickle."""

from __future__ import annotations

import numpy as np
import pytest

from mstkd.errors import InputError
from mstkd.runconfig import RunConfig
from server.state import ServerCheckpoint, restore_strategy, strategy_state


def test_strategy_state_round_trips():
    from flwr.app import Array, ArrayRecord

    from server.runlog import RunLog
    from server.strategy import make_strategy

    fedadam = RunConfig.parse({"strategy": "fedadam"})
    strategy = make_strategy(fedadam, runlog=RunLog("/nonexistent"), nodes=3)
    strategy.current_arrays = ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})
    strategy.m_t = {"w": np.full(3, 0.5)}
    strategy.v_t = {"w": np.full(3, 0.25)}
    state = strategy_state(strategy)
    fresh = make_strategy(fedadam, runlog=RunLog("/nonexistent"), nodes=3)
    restore_strategy(fresh, state)
    assert np.array_equal(fresh.m_t["w"], np.full(3, 0.5)) and np.array_equal(fresh.v_t["w"], np.full(3, 0.25))
    assert np.array_equal(fresh.current_arrays["w"].numpy(), np.ones(3))


def test_server_state_is_arrays_and_json_and_an_old_pickle_is_refused(tmp_path):
    state = ServerCheckpoint(
        round=2,
        arrays={"student.w": np.ones(3, np.float32)},
        strategy={
            "m_t": {"student.w": np.full(3, 0.5)},
            "momentum_vector": [np.zeros(2)],
            "wrapper.clipping_norm": 0.3,
        },
        records={0: {"round": 0}, 1: {"round": 1, "sites": {"7": {"name": "a"}}}},
        best={"round": 1, "val_mean_dice": 0.4},
        state_key="run-1.abcd",
        random_state=(3, tuple(range(625)), None),
        privacy={"schema_version": 1},
    )
    state.save(tmp_path)
    with np.load(tmp_path / ServerCheckpoint.FILE, allow_pickle=False) as npz:  # plain arrays, no objects
        assert all(npz[name].dtype != object for name in npz.files)
    back = ServerCheckpoint.load(tmp_path)
    assert back.round == 2 and back.records[1]["sites"]["7"]["name"] == "a" and back.state_key == "run-1.abcd"
    assert np.array_equal(back.strategy["m_t"]["student.w"], np.full(3, 0.5))
    assert back.strategy["wrapper.clipping_norm"] == 0.3 and back.random_state[1][624] == 624

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "server_state.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(InputError, match="never loaded"):
        ServerCheckpoint.load(tmp_path / "old")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ServerCheckpoint.FILE).write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(InputError, match="not a readable server state"):
        ServerCheckpoint.load(tmp_path / "bad")
    state.arrays = {"student.w": np.array([np.nan], np.float32)}
    state.save(tmp_path / "nan")
    with pytest.raises(InputError, match="not finite"):
        ServerCheckpoint.load(tmp_path / "nan")
    state.arrays = {"student.w": np.ones(3, np.float32)}
    state.state_key = "../../elsewhere"  # would make every node refuse every round; refused once, at start
    state.save(tmp_path / "key")
    with pytest.raises(InputError, match="its state key '../../elsewhere' is not a plain folder name"):
        ServerCheckpoint.load(tmp_path / "key")
