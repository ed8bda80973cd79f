"""What the server keeps between rounds (server.state): the strategy's state, arrays and JSON, never a pickle."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mstkd.errors import InputError
from mstkd.runconfig import RunConfig
from server.state import ServerCheckpoint, restore_strategy, strategy_memory, strategy_state


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


def test_a_resumed_fixed_clipping_norm_is_the_run_configs_and_an_adaptive_one_is_restored():
    """The nodes clip at the run config's dp-clip and refuse another: a DP run resumed with another dp-clip clips at it
    (the noise multiplier, which the account counts, is unchanged); an adaptive norm is memory and comes back."""
    from server.privacy import privacy_settings, wrap_for_privacy
    from server.runlog import RunLog
    from server.strategy import make_strategy

    def wrapped(**settings):
        run = RunConfig.parse({"dp": "client", "min-nodes": 3, **settings})
        return wrap_for_privacy(make_strategy(run, runlog=RunLog("/nonexistent"), nodes=3), privacy_settings(run))

    fixed = wrapped(**{"dp-clip": 0.25})
    restore_strategy(fixed, {"wrapper.clipping_norm": 0.5})
    assert fixed.clipping_norm == 0.25
    adaptive = wrapped(**{"dp-clip": 0.25, "dp-clipping": "adaptive"})
    restore_strategy(adaptive, {"wrapper.clipping_norm": 0.5})
    assert adaptive.clipping_norm == 0.5
    # a fixed run's state holds no norm, so an adaptive run resumed from it starts at its own dp-clip
    assert "wrapper.clipping_norm" not in strategy_memory(fixed) and strategy_memory(adaptive)["wrapper.clipping_norm"]
    resumed = wrapped(**{"dp-clip": 0.25, "dp-clipping": "adaptive"})
    restore_strategy(resumed, strategy_memory(fixed))
    assert resumed.clipping_norm == 0.25


def _records() -> dict[int, dict]:
    """Two rounds' records as the server writes them: the held-out scores of round 0, and round 1 with one node's
    numbers, a refused reply, a collapse warning and the privacy spent."""
    from server.runlog import RunLog

    runlog = RunLog("/nonexistent")
    scores = {f"{region}_{score}": 0.1 for region in ("ET", "TC", "WT") for score in ("dice", "hd95", "share_max")}
    runlog.record(0)["global"] = scores | {"mean_dice": 0.1, "ET_hd95": float("nan")}
    runlog.site(1, 7, "a").update({"train-loss": 1.5, "train-time-train": 2.0, "device": "cpu"})
    runlog.record(1)["failures"].append({"stage": "train", "node": 8, "reason": "refused: x", "kind": "refused"})
    runlog.record(1)["collapse"] = [{"where": "site a validation", "what": "WT predicted in 50% of the brain"}]
    privacy = {"mode": "client", "clipping": "fixed", "clipping_norm": 1.0, "noise_multiplier": 0.1}
    privacy |= {"sampled_nodes": 3, "noise_stdev": 0.03, "delta": 1e-5, "max_epsilon": None, "epsilon": 4.2}
    runlog.record(1).update(wall_seconds=3.0, step_norm=0.2, privacy=privacy)
    return runlog.records


def test_server_state_is_arrays_and_json_and_an_old_pickle_is_refused(tmp_path):
    state = ServerCheckpoint(
        round=2,
        arrays={"student.w": np.ones(3, np.float32)},
        strategy={
            "m_t": {"student.w": np.full(3, 0.5)},
            "momentum_vector": [np.zeros(2)],
            "wrapper.clipping_norm": 0.3,
        },
        records=_records(),
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


def test_a_resumed_states_records_are_shown_after_training_without_failing(tmp_path):
    """What the progress line, metrics.csv, the plot, the phase table and REPORT.md read of a resumed state's rounds."""
    from omegaconf import OmegaConf

    from server.phases import time_phases
    from server.report import write_report
    from server.runlog import RunLog

    ServerCheckpoint(round=1, arrays={"w": np.ones(3, np.float32)}, records=_records(), state_key="run-1.ab").save(
        tmp_path
    )
    runlog = RunLog(tmp_path / "run")
    runlog.records = dict(ServerCheckpoint.load(tmp_path).records)
    assert "1/2 sites (failed: 8)" in runlog.progress(1, 2)
    runlog.write()
    (tmp_path / "run" / "eval").mkdir()
    (tmp_path / "run" / "eval" / "round_0.md").write_text("| table |\n")
    phases = time_phases(runlog.records, 1.0, 10.0)
    cfg = OmegaConf.create({"model": {"preset": "tiny"}})
    report = write_report(tmp_path / "run", runlog, cfg, RunConfig(), 10.0, {"round": None}, phases=phases)
    text = report.read_text()
    assert "client-side clipping at 1" in text and "| 1 | 4.200 | 1e-05 |" in text and "site a validation" in text


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (lambda r: r[1].update(bytes_sent="1e9"), "round 1's record: 'bytes_sent' is not what the server writes there"),
        (lambda r: r[1]["sites"]["7"].update(loss={"x": 1}), "round 1's record: 'sites' is not what the server"),
        (lambda r: r[1]["sites"]["7"].update(**{"train-time-train": "x"}), "round 1's record: 'sites' is not"),
        (lambda r: r[1].update(failures=["x"]), "round 1's record: 'failures' is not what the server"),
        (lambda r: r[1].update(failures=[{}]), "round 1's record: 'failures' is not what the server"),
        (lambda r: r[1].update(collapse=[{}]), "round 1's record: 'collapse' is not what the server"),
        (lambda r: r[1]["privacy"].update(epsilon="x"), "round 1's record: 'privacy' is not what the server"),
        (lambda r: r[1]["privacy"].pop("noise_stdev"), "round 1's record: 'privacy' is not what the server"),
        (lambda r: r[0]["global"].update(mean_dice="0.9"), "round 0's record: 'global' is not what the"),
        (lambda r: r[0]["global"].pop("TC_dice"), "round 0's record: 'global' is not what the"),
        (lambda r: r[1].update(bounded=[{"node": 1, "norm": 10**400, "limit": 3.0}]), "round 1's record: 'bounded'"),
        (lambda r: r[1].update(bounded=[{"node": 1, "norm": 9.0}]), "round 1's record: 'bounded' is not what"),
        (lambda r: r[1].update(leak=1), "round 1's record: an unknown key 'leak'"),
        (lambda r: r[1].pop("sites"), "round 1's record: no 'sites'"),
        (lambda r: r[1].update(round=5), "round 1's record: it says it is round 5"),
        (lambda r: r.update({2: []}), "round 2's record: not a record"),
    ],
)
def test_a_resumed_states_round_records_are_checked_before_the_run_trains(tmp_path, tamper, reason):
    """A resumed run shows its earlier rounds in the progress line, the report, the plot and the trackers after it
    has trained: a record a file changed (a string where a number belongs) is refused at start, in one line."""
    records = _records()
    tamper(records)
    state = ServerCheckpoint(round=1, arrays={"w": np.ones(3, np.float32)}, records=records, state_key="run-1.ab")
    state.save(tmp_path)
    with pytest.raises(InputError, match=f"resume-from: .*: {re.escape(reason)}.*; it is not resumed"):
        ServerCheckpoint.load(tmp_path)


@pytest.mark.parametrize(
    "best", [{"round": "1", "val_mean_dice": 0.5}, {"round": 1, "val_mean_dice": float("nan")}, {"round": 9}]
)
def test_a_resumed_states_best_round_is_a_round_it_had_and_a_dice(tmp_path, best):
    """A NaN Dice would keep every later round from being best; a round it never had cannot be."""
    state = ServerCheckpoint(round=1, arrays={"w": np.ones(3, np.float32)}, records=_records(), state_key="run-1.ab")
    state.best = best
    state.save(tmp_path)
    with pytest.raises(InputError, match="its best round is not a round and a Dice"):
        ServerCheckpoint.load(tmp_path)
