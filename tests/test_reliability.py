"""Faults and privacy, in process: failing and silent nodes, skipped rounds, resume after a server crash,
broken cases at a site, differential privacy, and what a node's messages carry."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from client.app import app as client_app
from client.state import SiteState
from mstkd.config import load_config
from mstkd.data.sites import site_data
from mstkd.errors import InputError
from mstkd.model import build_networks
from mstkd.runconfig import NodeConfig, RunConfig
from mstkd.train import Networks, make_optimizers, seed_everything
from server.app import app as server_app
from server.state import ServerCheckpoint, restore_strategy, strategy_state
from tests.conftest import write_case, write_nifti
from tests.inproc import InProcGrid, by_name, nodes, run_inproc, tiny_run_config


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _round(message) -> int:
    return int(message.content["config"]["server-round"])


class Faulty:
    """A ClientApp stand-in that misbehaves on chosen (node, round) train calls and otherwise calls the app."""

    def __init__(self, node: int, rounds: set[int], mode: str) -> None:
        self.node, self.rounds, self.mode = node, rounds, mode
        self.release = threading.Event()

    def __call__(self, message, context):
        hit = (
            message.metadata.message_type == "train" and context.node_id == self.node and _round(message) in self.rounds
        )
        if hit and self.mode == "raise":
            raise RuntimeError("scanner archive unreachable")
        if hit and self.mode == "hang":
            self.release.wait(120)
            raise RuntimeError("released after the test")
        return client_app(message, context)


def test_a_node_that_raises_mid_round_is_logged_and_the_round_aggregates_the_others(tmp_path):
    run_config = tiny_run_config(tmp_path, **{"num-server-rounds": 3, "eval-subsets": "full"})
    grid = run_inproc(server_app, Faulty(node=2, rounds={2}, mode="raise"), run_config, nodes())
    records = _records(tmp_path / "run")
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    (failure,) = records[2]["failures"]
    assert failure["stage"] == "train" and failure["node"] == 2 and "scanner archive unreachable" in failure["reason"]
    assert "skipped" not in records[2]
    trained = {name for name, s in by_name(records[2]).items() if "train-loss" in s}
    assert trained == {"site-1", "site-3"}  # node 2 (site-2) is left out of round 2 only
    assert {name for name, s in by_name(records[3]).items() if "train-loss" in s} == {"site-1", "site-2", "site-3"}
    assert records[1]["failures"] == records[3]["failures"] == []
    assert sum(r.has_error() for r in grid.replies) == 1


def test_a_node_that_hangs_past_the_timeout_is_left_out(tmp_path):
    run_config = tiny_run_config(
        tmp_path, **{"num-server-rounds": 2, "eval-subsets": "full", "round-timeout": 4.0, "eval-every": 2}
    )
    faulty = Faulty(node=3, rounds={1}, mode="hang")
    try:
        run_inproc(server_app, faulty, run_config, nodes())
    finally:
        faulty.release.set()
    records = _records(tmp_path / "run")
    (failure,) = records[1]["failures"]
    assert failure["node"] == 3 and "no reply within the round timeout (4 s)" in failure["reason"]
    assert "skipped" not in records[1] and records[2]["failures"] == []
    assert "global" in records[2]  # the run went on to the end


def test_too_few_replies_skip_the_round_and_keep_the_model(tmp_path):
    run_config = tiny_run_config(tmp_path, **{"num-server-rounds": 2, "eval-subsets": "full", "min-replies": 3})
    grid = run_inproc(server_app, Faulty(node=1, rounds={1}, mode="raise"), run_config, nodes())
    records = _records(tmp_path / "run")
    assert records[1]["skipped"].startswith("2 of 3 nodes replied")
    assert "skipped" not in records[2]
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    first = {k: v.numpy() for k, v in next(m for m in sent if _round(m) == 1).content["arrays"].items()}
    second = {k: v.numpy() for k, v in next(m for m in sent if _round(m) == 2).content["arrays"].items()}
    assert all(np.array_equal(first[k], second[k]) for k in first)  # round 1 changed nothing


def test_missing_nodes_skip_rounds_instead_of_waiting_forever(tmp_path):
    run_config = tiny_run_config(tmp_path, **{"num-server-rounds": 2, "eval-subsets": "full", "node-wait": 0.5})
    grid = InProcGrid(client_app, run_config, nodes())
    grid.offline = {3}
    from flwr.app import Context, RecordDict

    from server.report import RunFailed

    with pytest.raises(RunFailed, match="no round aggregated"):  # so flwr ls and the launchers say failed
        server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)))
    records = _records(tmp_path / "run")
    assert [r.get("skipped") for r in records[1:]] == ["2 of 3 nodes connected after 0.5 s"] * 2
    # the connected nodes were asked for their voxel size (the plan goes on without the missing one); no round ran
    assert {(m.metadata.message_type, m.metadata.dst_node_id) for m in grid.sent} == {("query", 1), ("query", 2)}
    assert "**FAILED: no round aggregated (0 of 2 rounds aggregated).**" in (tmp_path / "run" / "REPORT.md").read_text()


class ServerKilled(BaseException):
    """Stands for the server process dying (not an Exception: nothing may catch it)."""


class KillAtRound(InProcGrid):
    def __init__(self, *args, round: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kill_round = round

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if any(m.metadata.message_type == "train" and _round(m) == self.kill_round for m in messages):
            raise ServerKilled  # the nodes trained round 3, the server died before it aggregated
        return replies


@pytest.mark.slow
def test_a_server_killed_after_round_2_resumes_to_the_same_result(tmp_path):
    from flwr.app import Context, RecordDict

    extra = {"num-server-rounds": 3, "eval-subsets": "full", "eval-every": 1, "transport": "float32"}
    whole = tiny_run_config(tmp_path / "whole", **extra)
    run_inproc(server_app, client_app, whole, nodes())

    broken = tiny_run_config(tmp_path / "crash", **extra)
    grid = KillAtRound(client_app, broken, nodes(), round=3)
    with pytest.raises(ServerKilled):
        server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(broken)))
    run = tmp_path / "crash" / "run"
    assert ServerCheckpoint.load(run).round == 2
    resumed = {**broken, "resume-from": str(run), "out-dir": ""}
    run_inproc(server_app, client_app, resumed, nodes())

    a, b = _records(tmp_path / "whole" / "run"), _records(run)
    assert [r["round"] for r in b] == [0, 1, 2, 3]
    for key, value in a[3]["global"].items():
        assert b[3]["global"][key] == pytest.approx(value, rel=1e-4, abs=1e-4), key
    final_a = torch.load(tmp_path / "whole" / "run" / "last.pt", weights_only=True)["student"]
    final_b = torch.load(run / "last.pt", weights_only=True)["student"]
    assert all(torch.allclose(final_a[k], final_b[k], atol=1e-5) for k in final_a)


def test_site_state_keeps_the_previous_round_for_a_resumed_round(tmp_path):
    cfg = load_config(["model=tiny"])
    nets = Networks(*build_networks(cfg.model))
    optimizers = make_optimizers(nets, cfg.train)
    rng = np.random.default_rng(0)
    state = SiteState(tmp_path)
    for r in (1, 2):
        state.save(nets, optimizers, rng, {"round": r, "rounds": r, "epoch": float(r)})
    assert state.load(nets, optimizers, rng, before_round=3)["round"] == 2
    assert state.load(nets, optimizers, rng, before_round=2)["round"] == 1  # round 2 is being redone
    assert state.load(nets, optimizers, rng, before_round=1) is None


def test_half_precision_site_state_halves_the_file_and_restores_float32_training_state(tmp_path):
    cfg = load_config(["model=tiny"])
    nets = Networks(*build_networks(cfg.model))
    optimizers = make_optimizers(nets, cfg.train)
    for p in [*nets.teacher.parameters(), *nets.student.parameters()]:
        p.grad = torch.randn_like(p) * 1e-6  # squared-gradient averages near 1e-12: below float16's range
    for _ in range(257):  # a step count that float16 and bfloat16 cannot hold exactly (257 -> 256)
        optimizers.main.step()
    rng = np.random.default_rng(0)
    full, half = SiteState(tmp_path / "full"), SiteState(tmp_path / "half", "half")
    for state in (full, half):
        state.save(nets, optimizers, rng, {"round": 1, "rounds": 1, "epoch": 1.0})
    assert 0.45 < half.path.stat().st_size / full.path.stat().st_size < 0.6
    stored = torch.load(half.path, weights_only=False)
    assert hasattr(stored["teacher"], "_metadata")  # what load_state_dict reads module versions from

    fresh = Networks(*build_networks(cfg.model))
    fresh_opt = make_optimizers(fresh, cfg.train)
    assert half.load(fresh, fresh_opt, np.random.default_rng(1))["round"] == 1
    restored = fresh.teacher.state_dict()
    for name, value in nets.teacher.state_dict().items():
        assert restored[name].dtype == value.dtype, name
        if value.is_floating_point():  # the teacher as float16 holds it, widened again
            assert torch.equal(restored[name], value.half().float()), name
    teacher = next(nets.teacher.parameters())
    moments = fresh_opt.main.state[next(fresh.teacher.parameters())]
    assert moments["exp_avg"].dtype == torch.float32 and float(moments["step"]) == 257  # counters never rounded
    expected = optimizers.main.state[teacher]["exp_avg_sq"]
    assert expected.min() > 0 and moments["exp_avg_sq"].min() > 0  # not flushed to zero
    assert torch.allclose(moments["exp_avg_sq"], expected, rtol=1e-2, atol=0)


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


# --------------------------------------------------------------------------- broken cases


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".mstkd-cache" not in p.parts
    }


def write_broken_site(root: Path, good: int = 3) -> dict[str, str]:
    """``good`` valid cases plus one of each kind of broken case; returns broken case -> what is wrong."""
    for i in range(good):
        write_case(root, f"FeTS2022_{i:05d}", seed=i)
    broken = {
        "FeTS2022_00101": "truncated",
        "FeTS2022_00102": "missing t1ce",
        "FeTS2022_00103": "shape mismatch",
        "FeTS2022_00104": "NaN voxels",
        "FeTS2022_00105": "wrong labels",
    }
    for case in broken:
        write_case(root, case, seed=7)
    t2 = root / "FeTS2022_00101" / "FeTS2022_00101_t2.nii.gz"
    t2.write_bytes(t2.read_bytes()[:200])
    (root / "FeTS2022_00102" / "FeTS2022_00102_t1ce.nii.gz").unlink()
    write_nifti(root / "FeTS2022_00103" / "FeTS2022_00103_t1.nii.gz", np.ones((20, 18, 9), np.float32))
    nan = np.full((20, 18, 14), 5.0, np.float32)
    nan[3, 3, 3] = np.nan
    write_nifti(root / "FeTS2022_00104" / "FeTS2022_00104_flair.nii.gz", nan)
    labels = np.zeros((20, 18, 14), np.uint8)
    labels[5:9, 5:9, 5:9] = 3  # 3 is not a FeTS label
    write_nifti(root / "FeTS2022_00105" / "FeTS2022_00105_seg.nii.gz", labels)
    return broken


def test_broken_cases_are_skipped_with_one_warning_each_and_left_untouched(tmp_path, caplog):
    broken = write_broken_site(tmp_path / "site")
    before = _tree_digest(tmp_path / "site")
    cfg = load_config(["model=tiny"])
    with caplog.at_level("WARNING", logger="mstkd.data"):
        data = site_data(RunConfig(), NodeConfig.parse({"data-path": str(tmp_path / "site")}), cfg)
    assert data.available.name == "flair+t1+t1ce+t2"  # one case without T1ce does not make the site lack it
    assert set(data.federation.skipped) == set(broken)
    kept = {e.case_id for e in data.train + data.val}
    assert kept == {"FeTS2022_00000", "FeTS2022_00001", "FeTS2022_00002"}
    lines = [r.getMessage() for r in caplog.records if r.name == "mstkd.data"]
    assert len(lines) == len(broken)
    for case in broken:
        (line,) = [m for m in lines if case in m]
        assert "\n" not in line
    assert "t1ce" in next(m for m in lines if "00102" in m)
    assert "NaN" in next(m for m in lines if "00104" in m)
    assert "label value" in next(m for m in lines if "00105" in m)
    assert _tree_digest(tmp_path / "site") == before  # nothing on disk modified or deleted


def test_a_site_with_no_usable_case_fails_its_replies_and_the_rounds_go_on(tmp_path):
    shape = (32, 32, 32)  # the tiny preset's crop
    for i in range(3):
        for site in ("a", "b"):
            write_case(tmp_path / site, f"FeTS2022_{i:05d}", seed=i + (10 if site == "b" else 0), shape=shape)
    write_case(tmp_path / "test", "FeTS2022_09000", seed=5, shape=shape)
    for case in ("FeTS2022_00200", "FeTS2022_00201"):  # site c: every case broken
        write_case(tmp_path / "c", case, seed=1, shape=shape)
        (tmp_path / "c" / case / f"{case}_seg.nii.gz").write_bytes(b"not a nifti file")
    run_config = tiny_run_config(
        tmp_path,
        **{
            "num-server-rounds": 2,
            "eval-subsets": "full",
            "test-data-path": str(tmp_path / "test"),
        },
    )
    node_configs = [{"data-path": str(tmp_path / s), "site-name": s} for s in ("a", "b", "c")]
    run_inproc(server_app, client_app, run_config, node_configs)
    records = _records(tmp_path / "run")
    assert [r["round"] for r in records] == [0, 1, 2]
    for rec in records[1:]:
        train_failures = [f for f in rec["failures"] if f["stage"] == "train"]
        # the server hears the category and a short code; which cases broke, and where, stays in the node's log
        assert len(train_failures) == 1
        assert train_failures[0]["reason"] == "data: no usable training case (details in the node's log)"
        assert "skipped" not in rec
        assert {n for n, s in by_name(rec).items() if "train-loss" in s} == {"a", "b"}


# --------------------------------------------------------------------------- differential privacy


def _global_step_norms(grid) -> list[float]:
    """L2 norm of the change of the global arrays between consecutive train rounds."""
    sent = {}
    for m in grid.sent:
        if m.metadata.message_type == "train":
            sent.setdefault(_round(m), {k: v.numpy().astype(np.float64) for k, v in m.content["arrays"].items()})
    rounds = sorted(sent)
    return [
        float(np.sqrt(sum(((sent[b][k] - sent[a][k]) ** 2).sum() for k in sent[a])))
        for a, b in zip(rounds, rounds[1:], strict=False)
    ]


@pytest.mark.parametrize("mode", ["off", "server", "client"])
def test_differential_privacy_clips_updates_and_logs_its_parameters(tmp_path, mode):
    clip = 0.05
    run_config = tiny_run_config(
        tmp_path,
        **{
            "num-server-rounds": 2,
            "eval-subsets": "full",
            "transport": "float32",
            "dp": mode,
            "dp-clip": clip,
            "dp-noise": 0.0,
        },
    )
    grid = run_inproc(server_app, client_app, run_config, nodes())
    (step,) = _global_step_norms(grid)
    records = _records(tmp_path / "run")
    if mode == "off":
        assert step > 2 * clip  # without clipping the tiny model moves further: the bound below is a real check
        assert "privacy" not in records[1]
    else:
        assert step <= clip * (1 + 1e-4)  # every site's update clipped to the norm, so is their mean
        assert records[1]["privacy"] == {
            "mode": mode,
            "clipping": "fixed",
            "clipping_norm": clip,
            "noise_multiplier": 0.0,
            "sampled_nodes": 3,
            "noise_stdev": 0.0,
            "delta": 1e-5,
            "max_epsilon": None,
            "epsilon": None,  # no noise: no finite epsilon, and the log says so
            "epsilon_note": "no noise: no finite epsilon",
        }
    assert not any(r.has_error() for r in grid.replies)


@pytest.mark.parametrize("mode", ["server", "client"])
def test_adaptive_clipping_moves_the_norm_towards_its_target(tmp_path, mode):
    """Every update clipped (a tiny first norm): the norm grows; none clipped (a huge one): it shrinks. Half the
    updates clipped is the target (dp-clip-quantile 0.5)."""
    norms = {}
    for start in (1e-3, 1e4):
        extra = {"num-server-rounds": 1, "eval-subsets": "full", "dp": mode, "dp-clipping": "adaptive"}
        extra["transport"] = "float32"  # a step clipped to 1e-3 is below float16's rounding of the model
        run_config = tiny_run_config(tmp_path / str(start), **extra, **{"dp-clip": start, "dp-noise": 0.0})
        grid = run_inproc(server_app, client_app, run_config, nodes())
        privacy = _records(tmp_path / str(start) / "run")[1]["privacy"]
        assert privacy["clipping"] == "adaptive" and privacy["target_quantile"] == 0.5
        norms[start] = privacy["clipping_norm_next"]
        if mode == "client":  # each site says whether it clipped its own update
            bits = [r.content["metrics"]["norm_bit"] for r in grid.replies if r.metadata.message_type == "train"]
            assert bits == [1, 1, 1] if start < 1 else bits == [0, 0, 0]
    assert norms[1e-3] > 1e-3 * 1.05 and norms[1e4] < 1e4 / 1.05


def test_dp_noise_moves_the_model_by_its_stdev(tmp_path):
    run_config = tiny_run_config(
        tmp_path,
        **{
            "num-server-rounds": 1,
            "eval-subsets": "full",
            "transport": "float32",
            "dp": "server",
            "dp-clip": 1e-6,
            "dp-noise": 3.0,
        },
    )
    run_inproc(server_app, client_app, run_config, nodes())
    record = _records(tmp_path / "run")[1]
    assert record["privacy"]["noise_stdev"] == pytest.approx(3.0 * 1e-6 / 3)
    # clipped to 1e-6, the update is all noise: last.pt - the initial model has that stdev per weight
    from mstkd.checkpoint import load_checkpoint
    from mstkd.model import MSTKDNet

    net, cfg, _ = load_checkpoint(tmp_path / "run" / "last.pt")
    seed_everything(int(cfg.train.seed))  # as the server does before it builds the initial model
    initial = MSTKDNet(cfg.model)
    diffs = np.concatenate(
        [(a - b).numpy().ravel() for a, b in zip(net.state_dict().values(), initial.state_dict().values(), strict=True)]
    )
    assert diffs.std() == pytest.approx(1e-6, rel=0.1)


def test_dp_reports_epsilon_every_round_from_flowers_accountant(tmp_path):
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    extra = {"num-server-rounds": 2, "eval-subsets": "full", "dp": "server", "dp-clip": 1.0, "dp-noise": 1.5}
    run_inproc(server_app, client_app, tiny_run_config(tmp_path, **extra), nodes())
    records = _records(tmp_path / "run")
    accountant = RdpAccountant(
        PrivacyConfig(1e-5, 3, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION)
    )
    for r in (1, 2):  # one release of the Gaussian mechanism over the 3 sites per aggregated round
        accountant.compose(GaussianPrivacyEvent(noise_multiplier=1.5, sample_size=3, population_size=3))
        assert records[r]["privacy"]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5))
        assert records[r]["privacy"]["releases"] == r
    assert records[2]["privacy"]["epsilon"] > records[1]["privacy"]["epsilon"] > 0
    report = (tmp_path / "run" / "REPORT.md").read_text()
    assert "## Differential privacy" in report and f"| 2 | {records[2]['privacy']['epsilon']:.3f} | 1e-05 |" in report


def test_dp_max_epsilon_ends_training_cleanly_before_the_budget_is_exceeded(tmp_path):
    extra = {"num-server-rounds": 4, "eval-subsets": "full", "dp": "server", "dp-clip": 1.0, "dp-noise": 1.0}
    run_inproc(server_app, client_app, tiny_run_config(tmp_path, **extra, **{"dp-max-epsilon": 6.0}), nodes())
    records = _records(tmp_path / "run")
    assert [r["round"] for r in records] == [0, 1]  # epsilon 4.73 after one round; a second would pass 6
    assert records[1]["privacy"]["epsilon"] < 6.0
    report = (tmp_path / "run" / "REPORT.md").read_text()
    assert "The run ended early" in report and "dp-max-epsilon 6" in report
    assert (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "best.pt").exists()


def test_dp_max_epsilon_without_noise_is_refused():
    from server.privacy import privacy_settings

    with pytest.raises(InputError, match="dp-max-epsilon needs dp-noise"):
        privacy_settings(RunConfig.parse({"dp": "server", "dp-noise": 0.0, "dp-max-epsilon": 3.0, "min-nodes": 3}))


# --------------------------------------------------------------------------- what leaves a site


def test_message_audit_only_student_discriminator_and_scalars_leave_a_site(tmp_path):
    run_config = tiny_run_config(tmp_path, **{"num-server-rounds": 2, "eval-subsets": "full"})
    grid = run_inproc(server_app, client_app, run_config, nodes())
    case_ids = {p.name for p in (tmp_path / "work" / "phantoms").glob("*/FeTS2022_*")}
    assert case_ids
    teacher_states = [
        torch.load(p, weights_only=False)["teacher"] for p in (tmp_path / "work" / "nodes").glob("*/*/local.pt")
    ]
    teacher_arrays = [v.numpy() for t in teacher_states for v in t.values() if v.numel() > 16]
    # each node's voxel-size report before round 1 (four numbers), then train + evaluate, 2 rounds, 3 nodes
    reports = [r for r in grid.replies if r.metadata.message_type == "query"]
    assert len(reports) == 3 and len(grid.replies) == 3 + 2 * 2 * 3
    for reply in reports:
        assert set(reply.content.keys()) == {"metrics"}
        assert set(reply.content["metrics"]) == {"num-examples", "spacing-0", "spacing-1", "spacing-2"}
    for reply in grid.replies:
        assert not reply.has_error()
        content = reply.content
        assert set(content.keys()) <= {"arrays", "metrics", "site"}
        for record in content.array_records.values():
            for key, array in record.items():
                assert key.startswith(("student.", "disc.")), key
                values = array.numpy()
                assert values.ndim <= 5 and values.size < 5_000_000
                for t in teacher_arrays:  # no teacher tensor under another name
                    assert not (t.shape == values.shape and np.array_equal(t.astype(values.dtype), values))
        for record in content.metric_records.values():
            assert all(isinstance(v, int | float) for v in record.values())  # scalars only, no lists
        for record in content.config_records.values():
            assert set(record.keys()) <= {"name", "device", "modalities"}
            for value in record.values():
                assert isinstance(value, str) and not any(case in value for case in case_ids)


# --------------------------------------------------------------------------- secure aggregation


def test_secagg_aggregate_equals_plain_fedavg(tmp_path, monkeypatch):
    import client.app as client_module
    import client.site

    updates: dict[int, tuple[dict, int]] = {}
    plain_round = client.site.local_round

    def recording_round(context, arrays, config, transport=None):
        out = plain_round(context, arrays, config, transport)
        updates[context.node_id] = ({k: v.astype(np.float64) for k, v in out[0].items()}, out[1]["num-examples"])
        return out

    monkeypatch.setattr(client.site, "local_round", recording_round)
    run_config = tiny_run_config(
        tmp_path, **{"num-server-rounds": 1, "eval-subsets": "full", "secagg": True, "secagg-max-weight": 10.0}
    )
    grid = run_inproc(server_app, client_module.app, run_config, nodes())
    assert sorted(updates) == [1, 2, 3]

    total = sum(n for _, n in updates.values())
    fedavg = {k: sum(u[k] * n for u, n in updates.values()) / total for k in next(iter(updates.values()))[0]}
    from mstkd.checkpoint import load_checkpoint

    net, _, _ = load_checkpoint(tmp_path / "run" / "last.pt")
    student = {f"student.{k}": v.numpy() for k, v in net.state_dict().items()}
    worst = max(float(np.abs(student[k] - fedavg[k]).max()) for k in student)
    # SecAgg+ scales each update by n / max-weight and quantises it to 2**22 levels over [-8, 8]
    bound = 3 * (16 / 2**22) * 10.0 / total
    assert worst < 2 * bound + 1e-6, (worst, bound)
    assert any(float(np.abs(u[k] - fedavg[k]).max()) > 1e-3 for u, _ in updates.values() for k in student)

    # what leaves a node is masked: no float arrays at all, and masked vectors uncorrelated with the update
    from flwr.common.secure_aggregation.secaggplus_constants import Key
    from flwr.compat.common.parameter import bytes_to_ndarray

    names = sorted(fedavg)  # the order both sides pack the federated arrays in
    checked = 0
    for reply in grid.replies:
        assert not any(len(record) for record in reply.content.array_records.values())
        for record in reply.content.config_records.values():
            if Key.MASKED_PARAMETERS not in record:
                continue
            masked = [bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS]][1:]  # [0]: the weight factor
            update, _ = updates[reply.metadata.src_node_id]
            for name, vector in zip(names, masked, strict=True):
                if vector.size >= 1000:
                    corr = np.corrcoef(vector.ravel().astype(np.float64), update[name].ravel())[0, 1]
                    # a random mask leaves a correlation of sd 1 / sqrt(n); 6 sd keeps false alarms under 1e-8
                    # per vector, while an unmasked quantised vector correlates at about 1
                    assert abs(corr) < 6 / np.sqrt(vector.size), (name, corr)
                    checked += 1
    assert checked > 0
    record = _records(tmp_path / "run")[1]
    assert record["secure_aggregation"] == "SecAgg+" and set(by_name(record)) == {"site-1", "site-2", "site-3"}


def test_the_privacy_ledger_survives_a_server_restart():
    from server.privacy import PrivacyLedger, privacy_settings

    privacy = privacy_settings(RunConfig.parse({"dp": "client", "dp-clip": 1.0, "dp-noise": 2.0, "min-nodes": 3}))
    first = PrivacyLedger(privacy, 3)
    first.release()
    resumed = PrivacyLedger(privacy, 3, state=first.state())  # what ServerCheckpoint carries
    assert resumed.release()["epsilon"] == pytest.approx(first.release()["epsilon"])
    assert resumed.release()["releases"] == 3


def test_site_state_is_chosen_without_reading_a_state_file(tmp_path, monkeypatch):
    """At `paper` size a state file is gigabytes: a round reads exactly the one it restores, and a save none."""
    import client.state

    cfg = load_config(["model=tiny"])
    nets = Networks(*build_networks(cfg.model))
    optimizers = make_optimizers(nets, cfg.train)
    rng = np.random.default_rng(0)
    state = SiteState(tmp_path)
    reads = []
    real_load = torch.load
    monkeypatch.setattr(
        client.state.torch, "load", lambda path, **kw: reads.append(Path(path).name) or real_load(path, **kw)
    )
    for r in (1, 2, 3):
        state.save(nets, optimizers, rng, {"round": r, "rounds": r, "epoch": float(r)})
    assert reads == []  # the sidecars told which round each file holds
    assert state.load(nets, optimizers, rng, before_round=3)["round"] == 2
    assert reads == ["local.prev.pt"]  # local.pt (round 3) was skipped without being read
    (tmp_path / "local.json").write_text("{}")  # a sidecar that does not describe its file is ignored
    assert state.info(tmp_path / "local.pt")["round"] == 3 and reads[-1] == "local.pt"
