"""Experiment tracking (mstkd.tracking): the tracker names, and an MLflow run read back through MLflow's API."""

from __future__ import annotations

import math
import os
import sqlite3

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


def _planted_store(run, experiment_location=None):
    """A run folder copied from elsewhere: its mlflow.db holds the experiment and a run tagged with its path."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    location = experiment_location or (run / "mlflow-artifacts").as_uri()
    experiment_id = client.create_experiment("mstkd", artifact_location=location)
    tags = {"mstkd.run_folder": run.resolve().as_posix()}
    return client.create_run(experiment_id, run_name="planted", tags=tags).info.run_id


@pytest.mark.parametrize("attack", ["experiment-elsewhere", "run-elsewhere", "run-s3", "linked-artefact-folder"])
def test_a_copied_run_folder_cannot_send_artefacts_outside_it(tmp_path, monkeypatch, capsys, attack):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    run, elsewhere = tmp_path / "run", tmp_path / "some" / "other" / "place"
    run.mkdir()
    elsewhere.mkdir(parents=True)
    run_id = _planted_store(run, elsewhere.as_uri() if attack == "experiment-elsewhere" else None)
    if attack.startswith("run-"):  # the run's own artefact URI, edited in the copied database
        target = elsewhere.as_uri() if attack == "run-elsewhere" else "s3://bucket/x"
        with sqlite3.connect(run / "mlflow.db") as db:
            db.execute("UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?", (target, run_id))
    if attack == "linked-artefact-folder":
        (run / "mlflow-artifacts").symlink_to(elsewhere, target_is_directory=True)
    (run / "config.yaml").write_text("secret: config\n")
    # the folder's run resumed; or a new run, which takes the copied experiment's (or linked folder's) place
    for resumed in (True,) if attack.startswith("run-") else (True, False):
        tracker = Tracker(run, "mlflow")
        tracker.start("run", {}, resumed=resumed)
        tracker.log(1, {"loss": 1.0})
        tracker.finish([run / "config.yaml"])
        assert not tracker.backends and "mlflow.db keeps this run's artefacts outside" in capsys.readouterr().err
    assert not any(p.is_file() for p in elsewhere.rglob("*"))


def test_an_artefact_that_is_a_link_or_under_a_linked_folder_is_not_uploaded(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "id_rsa").write_text("PRIVATE KEY")
    (secrets / "round_1.md").write_text("PRIVATE TABLE")
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"weights")
    (run / "config.yaml").symlink_to(secrets / "id_rsa")  # a link to a secret file
    (run / "eval").symlink_to(secrets, target_is_directory=True)  # a regular file, reached through a linked folder
    os.mkfifo(run / "log.jsonl")  # not a regular file: reading it would block
    tracker = Tracker(run, "mlflow")
    tracker.start("run", {})
    tracker.finish([run / "best.pt", run / "config.yaml", run / "eval" / "round_1.md", run / "log.jsonl"])
    err = capsys.readouterr().err
    assert [line.endswith("or outside the run folder") for line in err.splitlines() if "warning" in line] == [True] * 3
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    [found] = client.search_runs([client.get_experiment_by_name("mstkd").experiment_id])
    assert [a.path for a in client.list_artifacts(found.info.run_id)] == ["best.pt"]
    assert found.info.status == "FINISHED"


def test_a_tracking_warning_does_not_show_the_password_of_the_tracking_uri(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cretPW@127.0.0.1:1")  # nothing answers there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracker = Tracker(tmp_path, "mlflow")
    tracker.start("run", {})
    err = capsys.readouterr().err
    assert "MLflow tracking stopped" in err and "127.0.0.1:1" in err
    assert "s3cretPW" not in err and "alice" not in err


def test_any_backend_warning_loses_url_credentials(tmp_path, capsys):
    class _Failing:
        def start(self, *args):
            raise ConnectionError(
                "POST https://bob:p@ss@wandb.example/api and ftp://u:x@h/f failed; "
                "postgresql://db:5432/mlflow?sslpassword=hunter2&application_name=x&Access_Token=t0k"
            )

    tracker = Tracker(tmp_path)
    tracker.backends = [_Failing()]
    tracker.start("run", {})
    err = capsys.readouterr().err
    assert "https://wandb.example/api and ftp://h/f failed" in err and "p@ss" not in err and "bob" not in err
    assert "mlflow?sslpassword=***&application_name=x&Access_Token=***" in err
    assert "hunter2" not in err and "t0k" not in err


def test_a_run_folder_with_quotes_in_its_name_resumes_its_own_run(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'shared.db'}")  # one store for both folders
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    quoted, similar = tmp_path / 'run\'q "x" \\z', tmp_path / "run_q _x_ _z"
    for folder, loss in ((quoted, 2.0), (similar, 9.0)):  # the similar one is later: first in a LIKE search
        first = Tracker(folder, "mlflow")
        first.start("run", {})
        first.log(1, {"loss": loss})
    again = Tracker(quoted, "mlflow")
    again.start("run", {}, resumed=True)
    again.log(2, {"loss": 1.0})
    again.finish()
    assert again.backends and "warning:" not in capsys.readouterr().err
    client = MlflowClient(f"sqlite:///{tmp_path / 'shared.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mstkd").experiment_id])
    [run] = [r for r in runs if r.data.tags["mstkd.run_folder"] == quoted.resolve().as_posix()]
    assert len(runs) == 2 and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 2.0), (2, 1.0)]
