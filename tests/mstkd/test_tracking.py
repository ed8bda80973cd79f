"""Experiment tracking (mstkd.tracking): the tracker names, and an MLflow run read back through MLflow's API."""

from __future__ import annotations

import math

import pytest

from mstkd.errors import InputError
from mstkd.tracking import Tracker, parse_trackers


def test_tracker_names_are_checked_before_any_work():
    assert parse_trackers(("tensorboard", "mlflow,tensorboard")) == ("tensorboard", "mlflow")
    assert parse_trackers(["", ""]) == ()
    with pytest.raises(InputError, match="tracker wandb: choose from tensorboard, mlflow"):
        Tracker("unused", "mlflow,wandb")
    assert not Tracker("unused", ("", "")).enabled


def test_an_mlflow_run_keeps_params_metrics_artefacts_and_its_end(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    tracker = Tracker(tmp_path, "mlflow")
    tracker.start("seed-0", {"run": {"lr": 0.001}, "config": {"data": {"patch_size": [64, 64, 64]}}})
    tracker.log(1, {"val": {"WT_dice": 0.5, "flair+t1ce": 0.25, "missing": math.nan}, "note": "text is left out"})
    tracker.log(2, {"val": {"WT_dice": 0.75}})
    (tmp_path / "best.pt").write_bytes(b"weights")
    tracker.finish([tmp_path / "best.pt", tmp_path / "absent.md"])
    tracker.finish()  # a second end leaves the first as it was

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.run_name == "seed-0" and run.info.status == "FINISHED"
    assert run.data.params == {"run/lr": "0.001", "config/data/patch_size": "[64, 64, 64]"}
    history = client.get_metric_history(run.info.run_id, "val/WT_dice")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]
    assert set(run.data.metrics) == {"val/WT_dice", "val/flair_t1ce"}  # '+' is not a key character; NaN not logged
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["best.pt"]


def test_a_run_that_raises_is_marked_failed(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'shared.db'}")  # a store given from outside
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    tracker = Tracker(tmp_path / "run", ["mlflow"])
    with pytest.raises(RuntimeError), tracker.failed_on_error():
        tracker.start("broken", {})
        tracker.log(1, {"loss": 1.0})
        raise RuntimeError("the run stops")
    client = MlflowClient(f"sqlite:///{tmp_path / 'shared.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("mstkd").experiment_id])
    assert run.info.status == "FAILED" and not (tmp_path / "run" / "mlflow.db").exists()
    assert (tmp_path / "mlflow-artifacts").is_dir() or not client.list_artifacts(run.info.run_id)


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    first = Tracker(tmp_path, "mlflow")
    first.start("run", {"lr": 0.1})
    first.log(1, {"loss": 2.0})  # then the process is killed: the MLflow run stays RUNNING
    again = Tracker(tmp_path, "mlflow")
    again.start("run", {"lr": 0.1}, resumed=True)
    again.log(2, {"loss": 1.0})
    again.finish()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("mstkd").experiment_id])
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 2.0), (2, 1.0)]


def test_a_tracker_that_fails_is_dropped_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    (tmp_path / "a file").write_text("not a folder")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///" + str(tmp_path / "a file" / "x.db"))
    tracker = Tracker(tmp_path, "tensorboard,mlflow")
    tracker.start("run", {})  # MLflow cannot open its database
    tracker.log(1, {"loss": 1.0})
    tracker.finish()
    assert "MLflow tracking stopped" in capsys.readouterr().err
    assert [type(b).__name__ for b in tracker.backends] == ["_TensorBoard"]
    assert list((tmp_path / "tensorboard").iterdir())  # TensorBoard went on
