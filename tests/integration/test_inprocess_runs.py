"""Whole federations in process: ServerApp + three ClientApps on tiny phantoms (what travels, what stays, what a
run writes, transports and strategies, missing modalities, the agreed target geometry)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from client.app import app as client_app
from mstkd.checkpoint import checkpoint_geometry, load_checkpoint
from mstkd.cli import main as mstkd_main
from mstkd.config import load_config
from mstkd.data.geometry import TargetGeometry
from mstkd.model import MSTKDNet, build_discriminator
from server.app import app as server_app
from server.runlog import ROUND_KEYS
from tests.helpers import NODES, by_name, nodes, run_inproc, tiny_run_config


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fed")
    run_config = tiny_run_config(tmp, tensorboard=True, tracker="mlflow", **{"eval-lesion": True, "eval-initial": True})
    with pytest.MonkeyPatch.context() as env:  # MLflow's local store in the run folder, whatever the shell sets
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        grid = run_inproc(server_app, client_app, run_config, nodes())
    return tmp, run_config, grid


def _federated_keys() -> set[str]:
    cfg = load_config(["model=tiny"]).model
    student = MSTKDNet(cfg)
    disc = build_discriminator(cfg)
    return {f"student.{k}" for k in student.state_dict()} | {f"disc.{k}" for k in disc.state_dict()}


def test_only_student_and_discriminator_travel(federation):
    _, _, grid = federation
    expected = _federated_keys()
    train_msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train_msgs) == 2 * NODES
    carrying = [w for w in grid.wire if w["arrays"]]
    assert {(w["direction"], w["type"]) for w in carrying} == {
        ("to-node", "train"),
        ("to-node", "evaluate"),
        ("to-server", "train"),
    }
    for w in carrying:
        assert set(w["arrays"]) == expected
        assert all(dtype == np.float16 for dtype in w["arrays"].values())  # the default transport


def test_teachers_stay_local_and_differ_per_node(federation):
    tmp, _, grid = federation
    states = sorted((tmp / "work" / "nodes").glob("*/*/local.pt"))
    assert len(states) == NODES
    teachers = [torch.load(p, weights_only=False)["teacher"] for p in states]
    key = next(k for k in teachers[0] if k.endswith("weight"))
    assert not torch.equal(teachers[0][key], teachers[1][key])
    assert not torch.equal(teachers[1][key], teachers[2][key])
    # no teacher tensor was ever sent or received, under any name
    shapes = {tuple(v.shape) for v in teachers[0].values()}
    sent_values = [
        a.numpy()
        for m in grid.sent + grid.replies
        if not m.has_error()
        for r in m.content.array_records.values()
        for a in r.values()
    ]
    t = teachers[0][key].numpy()
    assert not any(v.shape == t.shape and np.allclose(v.astype(np.float32), t, atol=1e-3) for v in sent_values)
    assert shapes  # the teacher has tensors at all


def test_run_log_checkpoints_and_report(federation, tmp_path):
    tmp, _, _ = federation
    run = tmp / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(set(r) <= ROUND_KEYS for r in records)  # the columns no node's name may take
    for r in records[1:]:
        assert set(by_name(r)) == {"site-1", "site-2", "site-3"}
        assert r["bytes_sent"] > 0 and r["bytes_received"] > 0 and r["wall_seconds"] > 0
        assert all("train-loss" in s and "val-mean-dice" in s for s in r["sites"].values())
        assert all(f"train-fg_{c}" in s for s in r["sites"].values() for c in ("NETC", "ED", "ET", "BG"))
        for s in r["sites"].values():  # where each message's time went, phase by phase
            phases = [v for k, v in s.items() if k.startswith("train-time-") and k != "train-time-startup"]
            assert s["train-time-train"] > 0 and s["val-time-evaluate"] > 0 and min(phases) >= 0
            assert sum(phases) <= s["client-seconds"] and "ray-node" not in s
        assert 0 <= r["global"]["mean_dice"] <= 1
        assert 0 <= r["global"]["WT_share_max"] <= 1 and "collapsed" in r["global"]
        assert all(0 <= r["global"][f"{x}_lesion_dice"] <= 1 for x in ("ET", "TC", "WT"))  # eval-lesion=true
    assert (run / "metrics.csv").read_text().count("\n") == 4
    import pandas as pd

    table = pd.read_csv(run / "metrics.csv")
    assert {"global/mean_dice", "val/val-mean-dice", "site-1/train-loss", "site-3/val-mean-dice"} <= set(table.columns)
    assert all(table[c].dtype.kind in "ifb" for c in table.columns if c.endswith(("dice", "loss", "bytes_sent")))
    assert (run / "dice.png").stat().st_size > 0 and (run / "eval" / "round_2.md").exists()
    assert "round" in (run / "REPORT.md").read_text()
    phases = json.loads((run / "phases.json").read_text())  # where the time went
    assert phases["seconds"]["site training"] > 0 and phases["seconds"]["global evaluation"] > 0
    assert phases["seconds"]["set-up"] > 0 and phases["total"] >= phases["rounds"] > 0
    assert "## Where the time went" in (run / "REPORT.md").read_text()
    net, cfg, payload = load_checkpoint(run / "best.pt")
    # chosen on the aggregated site-validation Dice; the held-out test Dice plays no part
    val = {r["round"]: r["val"]["val-mean-dice"] for r in records if "val" in r}
    assert payload["extra"]["round"] == max(val, key=val.get)
    assert payload["extra"]["val_mean_dice"] == pytest.approx(max(val.values()))
    assert cfg.model.preset == "tiny" and "test_mean_dice" not in payload["extra"]
    assert "site-validation" in (run / "REPORT.md").read_text()
    case = next(p for p in (tmp / "work" / "phantoms").glob("*/FeTS2022_*"))
    assert (
        mstkd_main(
            [
                "predict",
                "--checkpoint",
                str(run / "last.pt"),
                "--case",
                str(case),
                "--out",
                str(tmp_path / "seg.nii.gz"),
            ]
        )
        == 0
    )


def test_float32_transport_and_fedprox(tmp_path):
    run_config = tiny_run_config(
        tmp_path, **{"num-server-rounds": 1, "transport": "float32", "strategy": "fedprox", "eval-subsets": "full"}
    )
    grid = run_inproc(server_app, client_app, run_config, nodes())
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert train and all(m.content["config"]["proximal-mu"] > 0 for m in train)
    assert all(d == np.float32 for w in grid.wire for d in w["arrays"].values())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(s["train-proximal"] > 0 for s in records[1]["sites"].values())


def test_sites_with_missing_modalities(tmp_path):
    run_config = tiny_run_config(tmp_path, **{"num-server-rounds": 1, "drop-modalities": "2:t1ce; 3:t1ce,t2"})
    grid = run_inproc(server_app, client_app, run_config, nodes())
    assert not any(r.has_error() for r in grid.replies)
    record = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1]
    assert {s: v["modalities"] for s, v in by_name(record).items()} == {
        "site-1": "flair+t1+t1ce+t2",
        "site-2": "flair+t1+t2",
        "site-3": "flair+t1",
    }
    # what the sites lacking T1ce cached holds no T1ce, although the phantom files exist
    split = next((tmp_path / "work" / "phantoms").glob("*/partitioning.csv")).parent / ".mstkd-cache" / "split.csv"
    rows = [line.split(",") for line in split.read_text().splitlines()[1:]]
    cache = split.parent
    for site, case, part in rows:
        if part == "test":
            continue
        image = np.load(cache / case / "image.npy")
        assert (not image[2].any()) == (site in ("2", "3")), (site, case)
        assert (not image[3].any()) == (site == "3")


def test_tensorboard_has_a_point_per_round(federation):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _, _ = federation
    events = EventAccumulator(str(tmp / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"global/mean_dice", "global/WT_hd95", "site-1/train-loss", "val/val-mean-dice", "bytes_sent"} <= tags
    assert [e.step for e in events.Scalars("global/mean_dice")] == [0, 1, 2]
    assert [e.step for e in events.Scalars("site-2/train-loss")] == [1, 2]


def test_mlflow_holds_the_run_its_metrics_and_its_best_checkpoint(federation):
    """tracker=mlflow with no MLFLOW_TRACKING_URI: a local store in the run folder, read back through MLflow's API."""
    from mlflow.tracking import MlflowClient

    tmp, run_config, _ = federation
    client = MlflowClient(f"sqlite:///{tmp / 'run' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("mstkd").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["run/num-server-rounds"] == "2" and run.data.params["config/model/preset"] == "tiny"
    history = client.get_metric_history(run.info.run_id, "global/mean_dice")
    assert [m.step for m in history] == [0, 1, 2] and all(0 <= m.value <= 1 for m in history)
    records = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1].value == pytest.approx(records[-1]["global"]["mean_dice"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "site-2/train-loss")] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"best.pt", "REPORT.md", "metrics.csv", "round_2.md", "round_2.csv"} <= artifacts


def test_node_state_leaves_out_the_student_moments_the_next_round_resets(federation):
    tmp, _, _ = federation
    state = torch.load(next((tmp / "work" / "nodes").glob("*/*/local.pt")), weights_only=False)
    groups = state["optimizer"]["param_groups"]  # one Adam over [teacher, student]
    teacher_ids, student_ids = set(groups[0]["params"]), set(groups[1]["params"])
    assert teacher_ids and student_ids
    assert set(state["optimizer"]["state"]) == teacher_ids  # the teacher's moments only


def test_a_federation_agrees_on_one_target_and_a_bad_report_costs_only_its_sender(tmp_path, capsys):
    """Node 1 reports a voxel size that is not a number; the plan is made from the other two sites' reports,
    every node caches its cases at it, and the run's config and checkpoints store it."""
    from flwr.app import MessageType

    from client.app import app as client_app
    from server.app import app as server_app
    from tests.helpers import NODES, nodes, run_inproc, tiny_run_config

    def liar(message, context):
        reply = client_app(message, context)
        if message.metadata.message_type == MessageType.QUERY and context.node_id == 1:
            reply.content["metrics"]["spacing-0"] = float("nan")
        return reply

    grid = run_inproc(server_app, liar, tiny_run_config(tmp_path, **{"num-server-rounds": 1}), nodes())
    assert sum(w["type"] == MessageType.QUERY and w["direction"] == "to-node" for w in grid.wire) == NODES
    phantom = (5.0, 5.0, 4.84375)  # the 48 x 48 x 32 phantom grid
    out = capsys.readouterr().err
    assert "target geometry 5 x 5 x 4.84 mm LPS: the median of 2 sites' median voxel sizes (5 x 5 x 4.84 of " in out
    assert "1 site left out" in out
    run = tmp_path / "run"
    assert tuple(OmegaConf.load(run / "config.yaml").data.target_spacing) == phantom
    assert checkpoint_geometry(load_checkpoint(run / "last.pt")[2]) == TargetGeometry(phantom, "LPS")
    trains = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert trains and all(m.content["config"]["target-spacing"] == "5.0 5.0 4.84375" for m in trains)
