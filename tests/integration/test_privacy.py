"""Privacy, in process: differential privacy, what a node's messages carry, secure aggregation, and no case ID,
path or secret in a site's errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from client.app import app as client_app
from mstkd.train import seed_everything
from server.app import app as server_app
from tests.helpers import by_name, nodes, run_inproc, tiny_run_config
from tests.helpers import run_records as _records
from tests.helpers import server_round as _round

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


def test_with_client_side_dp_a_node_that_does_not_clip_is_refused(tmp_path, monkeypatch):
    """Node 1 sends the global model plus 100 times its clipped update (``scale``): the noise is calibrated to the
    clipping norm, so its reply is refused. The honest nodes' replies, clipped and rounded to float16, pass, and the
    round aggregates them (it was skipped: every node had to reply)."""
    import simulations.adversary as adversary

    monkeypatch.setattr(adversary, "SETTINGS", {"attacks": {"0": "scale"}})
    extra = {"num-server-rounds": 1, "eval-subsets": "full", "dp": "client", "dp-clip": 0.5, "dp-noise": 0.0}
    run_inproc(server_app, adversary.app, tiny_run_config(tmp_path, **extra), nodes())
    record = _records(tmp_path / "run")[1]
    (failure,) = record["failures"]
    assert failure["node"] == 1 and failure["kind"] == "refused"
    assert (
        failure["reason"].startswith("refused: its update is ")
        and "clipping norm 0.5: not clipped" in failure["reason"]
    )
    assert "skipped" not in record and "global" in record
    assert sorted(key for key, site in record["sites"].items() if "train-loss" in site) == ["2", "3"]


@pytest.mark.parametrize("mode", ["server", "client"])
def test_with_dp_a_node_that_fails_every_round_costs_only_its_own_update(tmp_path, monkeypatch, mode):
    """One node's replies are refused in every round (NaN values). With DP a round needed every node, so that node
    stopped the run from learning; now the others' clipped updates are summed and divided by the three nodes asked
    (the node that failed adds nothing), so one site still moves the model by at most dp-clip / 3, as the noise
    assumes."""
    import simulations.adversary as adversary

    monkeypatch.setattr(adversary, "SETTINGS", {"attacks": {"0": "nan"}})
    clip = 0.05
    extra = {"num-server-rounds": 2, "eval-subsets": "full", "transport": "float32", "dp": mode, "dp-clip": clip}
    grid = run_inproc(server_app, adversary.app, tiny_run_config(tmp_path, **extra, **{"dp-noise": 0.0}), nodes())
    records = _records(tmp_path / "run")
    for r in (1, 2):
        assert "skipped" not in records[r] and [f["node"] for f in records[r]["failures"]] == [1]
    asked = [(m, r) for m, r in zip(grid.sent, grid.replies, strict=True) if m.metadata.message_type == "train"]
    start = {k: v.numpy().astype(np.float64) for k, v in asked[-1][0].content["arrays"].items()}  # round 1's result
    honest = [r for m, r in asked if _round(m) == 2]
    assert sorted(r.metadata.src_node_id for r in honest) == [1, 2, 3]  # node 1's is refused
    total = {k: np.zeros_like(v) for k, v in start.items()}
    for reply in honest:
        if reply.metadata.src_node_id == 1:
            continue
        delta = {k: v.numpy().astype(np.float64) - start[k] for k, v in reply.content["arrays"].items()}
        norm = np.sqrt(sum(float((d**2).sum()) for d in delta.values()))
        assert norm <= clip * (1 + 1e-4) or mode == "server"  # client-side: each node clipped its own
        for k, d in delta.items():
            total[k] += d * min(1.0, clip / norm)  # server-side: the server clips
    from mstkd.checkpoint import load_checkpoint

    net, _, _ = load_checkpoint(tmp_path / "run" / "last.pt")
    for k, v in net.state_dict().items():
        expected = start[f"student.{k}"] + total[f"student.{k}"] / 3
        np.testing.assert_allclose(v.numpy(), expected, rtol=0, atol=1e-6)
    (step,) = _global_step_norms(grid)  # round 1's
    assert step <= 2 / 3 * clip * (1 + 1e-4)


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


def test_no_case_id_path_or_secret_leaves_a_site_in_an_error(tmp_path, monkeypatch):
    """Node c has only broken cases; node b's evaluation fails with a message holding a path, a case ID and an
    environment secret. The server's records hold the failures' categories, and none of those."""
    import client.site
    from tests.helpers import write_case

    secret = "s3cr3t-" + os.urandom(4).hex()
    monkeypatch.setenv("HOSPITAL_TOKEN", secret)
    shape = (32, 32, 32)
    for i in range(3):
        for site in ("a", "b"):
            write_case(tmp_path / site, f"FeTS2022_{i:05d}", seed=i + (10 if site == "b" else 0), shape=shape)
    write_case(tmp_path / "test", "FeTS2022_09000", seed=5, shape=shape)
    broken = ("FeTS2022_00777", "FeTS2022_00778")
    for case in broken:
        write_case(tmp_path / "c", case, seed=1, shape=shape)
        (tmp_path / "c" / case / f"{case}_seg.nii.gz").write_bytes(b"not a nifti file")
    real = client.site.evaluate_site

    def leaky(context, arrays, config):
        if context.node.site_name == "b":
            raise OSError(
                f"/data/hospital-b/FeTS2022_00001/t1.nii.gz unreadable (token {os.environ['HOSPITAL_TOKEN']})"
            )
        return real(context, arrays, config)

    monkeypatch.setattr(client.site, "evaluate_site", leaky)
    run_config = tiny_run_config(
        tmp_path, **{"num-server-rounds": 1, "eval-subsets": "full", "test-data-path": str(tmp_path / "test")}
    )
    node_configs = [{"data-path": str(tmp_path / s), "site-name": s, "worker": "off"} for s in ("a", "b", "c")]
    run_inproc(server_app, client_app, run_config, node_configs)
    reasons = {f["stage"]: f["reason"] for f in _records(tmp_path / "run")[1]["failures"]}
    assert reasons == {
        "train": "data: no usable training case (details in the node's log)",
        "evaluate": "io: a file could not be read or written (details in the node's log)",
    }
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            for needle in (secret, *broken, "FeTS2022_00001", "hospital-b"):
                assert needle.encode() not in text, (path.name, needle)


# --------------------------------------------------------------------------- secure aggregation


def _record_updates(monkeypatch) -> dict[int, tuple[dict, int]]:
    """Each node's update (float64, by name) and case count, by node id, as its local round returns them."""
    import client.site

    updates: dict[int, tuple[dict, int]] = {}
    plain_round = client.site.local_round

    def recording_round(context, arrays, config, transport=None):
        out = plain_round(context, arrays, config, transport)
        updates[context.node_id] = ({k: v.astype(np.float64) for k, v in out[0].items()}, out[1]["num-examples"])
        return out

    monkeypatch.setattr(client.site, "local_round", recording_round)
    return updates


def _assert_secagg_global_is_fedavg_of(run, updates: dict, counted: list[int], max_weight: float) -> dict:
    """The run's global student is the plain FedAvg of the counted nodes' updates, within SecAgg+'s quantisation;
    return that average."""
    from mstkd.checkpoint import load_checkpoint

    counted_updates = [updates[n] for n in counted]
    total = sum(n for _, n in counted_updates)
    fedavg = {k: sum(u[k] * n for u, n in counted_updates) / total for k in counted_updates[0][0]}
    net, _, _ = load_checkpoint(run / "last.pt")
    student = {f"student.{k}": v.numpy() for k, v in net.state_dict().items()}
    worst = max(float(np.abs(student[k] - fedavg[k]).max()) for k in student)
    # SecAgg+ scales each update by n / max-weight and quantises it to 2**22 levels over [-8, 8]
    bound = len(counted) * (16 / 2**22) * max_weight / total
    assert worst < 2 * bound + 1e-6, (worst, bound)
    assert any(float(np.abs(u[k] - fedavg[k]).max()) > 1e-3 for u, _ in counted_updates for k in student)
    return fedavg


def test_secagg_aggregate_equals_plain_fedavg(tmp_path, monkeypatch):
    import client.app as client_module

    updates = _record_updates(monkeypatch)
    run_config = tiny_run_config(tmp_path, **SECAGG_RUN)
    grid = run_inproc(server_app, client_module.app, run_config, nodes())
    assert sorted(updates) == [1, 2, 3]
    from mstkd.runconfig import RunConfig
    from server.loop import TTL_MARGIN  # every stage's messages expire after the round's wait, not after 12 h

    assert {m.metadata.ttl for m in grid.sent} == {RunConfig.parse(run_config).round_timeout + TTL_MARGIN}
    fedavg = _assert_secagg_global_is_fedavg_of(tmp_path / "run", updates, [1, 2, 3], SECAGG_RUN["secagg-max-weight"])

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


def test_under_secagg_a_fedprox_run_config_trains_without_the_proximal_term(tmp_path):
    """SecAgg+'s workflow averages whatever the strategy: it sends no proximal-mu, and the nodes, which take that term
    only as the run config sets it, expect none (they refused every round of such a run once)."""
    run_config = tiny_run_config(tmp_path, **SECAGG_RUN, strategy="fedprox")
    grid = run_inproc(server_app, client_app, run_config, nodes())
    assert not any(r.has_error() for r in grid.replies)
    record = _records(tmp_path / "run")[1]
    assert "skipped" not in record and len(record["sites"]) == 3, record


HOSTILE_SECAGG = {  # what one node answers at a stage of SecAgg+, from what it would have answered
    "setup": lambda honest: {"x": 1},
    "share_keys": lambda honest: {"dsts": [999], "ctxts": [b"x", b"y"]},
    # key shares for one neighbour only: the other neighbour's mask with this node would not cancel in the sum
    "share_keys-skip": lambda honest: {"dsts": honest["dsts"][:1], "ctxts": honest["ctxts"][:1]},
    "collect_masked_vectors": lambda honest: {"masked_params": [b"not an array"]},
    "unmask": lambda honest: {"nids": [999], "shares": [b"x"]},
    "unmask-skip": lambda honest: {"nids": honest["nids"][:1], "shares": honest["shares"][:1]},
    # of the right form, so no check can tell: the shares no longer combine, and the round is lost
    "unmask-shares": lambda honest: {**honest, "shares": [bytes(len(b)) for b in honest["shares"]]},
}


SECAGG_RUN = {"num-server-rounds": 1, "eval-subsets": "full", "secagg": True, "secagg-max-weight": 10.0}
"""One round of FedAvg with SecAgg+ (``secagg-max-weight`` about the tiny sites' case counts)."""


def _secagg_liars(lost: dict[int, str], table: dict | None = None):
    """The node app, but node ``n`` answers the stage that ``lost[n]`` (a key of ``table``, by default
    :data:`HOSTILE_SECAGG`) names with that entry's reply."""
    from flwr.app import ConfigRecord
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    import client.app as client_module

    def app(msg, context):
        record = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        asked = record.get(Key.STAGE) if record is not None else None  # read first: the node's mod consumes it
        reply = client_module.app(msg, context)
        kind = lost.get(context.node_id)
        if kind is not None and asked == kind.partition("-")[0]:
            honest = dict(reply.content.config_records[RECORD_KEY_CONFIGS])
            reply.content[RECORD_KEY_CONFIGS] = ConfigRecord((table or HOSTILE_SECAGG)[kind](honest))
        return reply

    return app


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(HOSTILE_SECAGG))
def test_a_malformed_secagg_reply_costs_its_node_not_the_run(tmp_path, monkeypatch, stage):
    """Flower's SecAgg+ workflow reads every reply's fields unchecked: one node's reply without them ended the
    whole run with a KeyError. Now it is that node's error, which the protocol treats as a dropped node; the round
    aggregates the others' updates, whichever stage the node is lost in (one lost in the first two stages lost the
    round for every node, and key shares that skipped a neighbour made the sum wrong). Except during the key
    exchange: of three nodes, each other node would be masked with one partner, which the protocol's terms count as
    too few (client/terms.py), so they refuse and the round halts with that reason
    (test_secagg_with_two_nodes_lost_at_different_stages_sums_the_others: six nodes go on)."""
    from server.report import RunFailed

    hostile = _secagg_liars({3: stage})
    updates = _record_updates(monkeypatch)
    run_config = tiny_run_config(tmp_path, **SECAGG_RUN)
    halts = stage == "unmask-shares" or stage.startswith("share_keys")
    if halts:  # the run goes on and, with its one round lost, ends as failed
        with pytest.raises(RunFailed, match="no round aggregated|the global model never changed"):
            run_inproc(server_app, hostile, run_config, nodes())
    else:  # raised KeyError, ValueError or IndexError, lost the round, or made the sum wrong before
        run_inproc(server_app, hostile, run_config, nodes())
    record = _records(tmp_path / "run")[1]
    if stage == "unmask-shares":
        assert record["skipped"].startswith("secure aggregation failed (ValueError: Failed to combine shares")
    elif halts:
        assert "2 x node refused: this run's secagg=true sends this site's update only under" in record["skipped"]
        assert "this node would be masked with 1 of the round's 2 other nodes" in record["skipped"]
    else:  # the reply was refused before the workflow read it: the protocol went on without its node
        assert "skipped" not in record
        counted = [1, 2, 3] if stage.startswith("unmask") else [1, 2]  # node 3's update is in the sum or not at all
        _assert_secagg_global_is_fedavg_of(tmp_path / "run", updates, counted, SECAGG_RUN["secagg-max-weight"])
    assert record["secure_aggregation"] == "SecAgg+" and "global" in record
    assert (tmp_path / "run" / "last.pt").is_file() and (tmp_path / "run" / "REPORT.md").is_file()


def test_a_secagg_round_that_halts_for_want_of_nodes_is_recorded_as_skipped_with_their_reasons(tmp_path):
    """Two of three nodes lost while unmasking leave too few shares: Flower's workflow halts and says no more. The
    round is recorded as skipped, with the stage and the reasons, and the run ends as one that never aggregated."""
    from server.report import RunFailed

    hostile = _secagg_liars({2: "unmask", 3: "unmask"})
    with pytest.raises(RunFailed, match="no round aggregated"):
        run_inproc(server_app, hostile, tiny_run_config(tmp_path, **SECAGG_RUN), nodes())
    skipped = _records(tmp_path / "run")[1]["skipped"]
    assert skipped.startswith("secure aggregation failed (RuntimeError: too few nodes left after its unmasking: 2 x ")
    assert "SecAgg+ unmask: nids does not name each node it was asked about once" in skipped


@pytest.mark.slow
@pytest.mark.parametrize("first", ["setup", "share_keys"])
def test_secagg_with_two_nodes_lost_at_different_stages_sums_the_others(tmp_path, monkeypatch, first):
    """Six nodes: node 4 is lost before it has shared its keys, node 5 after (its masked vector is refused). The
    round's sum is the FedAvg of nodes 1-3 and 6: node 5's masks with its neighbours are recovered from their shares,
    and node 4, forgotten, is in no neighbourhood the server unmasks (were it, the sum was wrong, or a KeyError ended
    the run). Six, not five: with node 4 lost during the key exchange, each node of five would be masked with 3
    partners at threshold 3, which the protocol's terms count as few enough for the unmasking answers to rebuild
    their keys, and refuse (client/terms.py)."""
    hostile = _secagg_liars({4: first, 5: "collect_masked_vectors"})
    updates = _record_updates(monkeypatch)
    run_config = tiny_run_config(tmp_path, **SECAGG_RUN, **{"min-nodes": 6, "phantom-cases": 36})
    run_inproc(server_app, hostile, run_config, [{"partition-id": i, "num-partitions": 6} for i in range(6)])
    record = _records(tmp_path / "run")[1]
    assert "skipped" not in record and record["secure_aggregation"] == "SecAgg+"
    _assert_secagg_global_is_fedavg_of(tmp_path / "run", updates, [1, 2, 3, 6], SECAGG_RUN["secagg-max-weight"])


def _weight_plus(extra: int):
    """A masked-vectors reply whose first value, the node's masked weight factor, is ``extra`` higher: the masks
    still cancel, and the unmasked sum of the weights, which the workflow divides the sum of updates by, is off by
    ``extra``."""
    from flwr.compat.common.parameter import bytes_to_ndarray, ndarray_to_bytes

    def lie(honest):
        factor = bytes_to_ndarray(honest["masked_params"][0])
        shifted = ((factor.astype(np.int64) + extra) % 2**32).astype(factor.dtype)
        return {**honest, "masked_params": [ndarray_to_bytes(shifted), *honest["masked_params"][1:]]}

    return lie


WEIGHT_LIES = {
    "collect_masked_vectors-weight+1": _weight_plus(1),
    "collect_masked_vectors-weight-all": _weight_plus(-(2**31)),
}


@pytest.mark.slow
@pytest.mark.parametrize("lie", sorted(WEIGHT_LIES))
def test_a_node_that_lies_about_its_secagg_weight_loses_the_round_not_the_run(tmp_path, lie):
    """The sum of the nodes' weight factors is masked like their updates, and it is what the workflow divides the
    summed updates by: a node that shifted its own scaled the round's model at will (a sum of 1 multiplied it by a
    million; 0 made it infinite, which stopped the run), and a shift of 1 went unseen. The server now checks the
    unmasked sum against the case counts the nodes sent in the clear; the round is skipped (the server sees no single
    weight, so no node can be blamed) and the model kept; the next round, honest, aggregates."""
    hostile = _secagg_liars({3: lie}, WEIGHT_LIES)
    once = {"lied": False}

    def first_round_only(msg, context):  # node 3 lies in round 1 only
        if once["lied"] or context.node_id != 3:
            return _secagg_liars({})(msg, context)
        reply = hostile(msg, context)
        once["lied"] = reply.has_content() and any("masked_params" in r for r in reply.content.config_records.values())
        return reply

    run_inproc(
        server_app, first_round_only, tiny_run_config(tmp_path, **{**SECAGG_RUN, "num-server-rounds": 2}), nodes()
    )
    records = _records(tmp_path / "run")
    assert records[1]["skipped"].startswith("secure aggregation failed (ValueError: the nodes' weights sum to")
    assert "skipped" not in records[2] and "global" in records[2]
    assert (tmp_path / "run" / "last.pt").is_file()


@pytest.mark.slow
def test_under_secagg_a_nodes_metrics_pass_the_same_name_and_clock_rules(tmp_path):
    """Under SecAgg+ the server cannot refuse one node's reply, so its metrics were kept under any plain name: a
    node could write the server's own `device` text key, a clock of 3e38 s (an infinite phase in phases.json) or a
    validation Dice in a train reply. Such metrics are now dropped, the node's update still summed."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    import client.app as client_module

    def app(msg, context):
        record = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        asked = record.get(Key.STAGE) if record is not None else None
        reply = client_module.app(msg, context)
        if asked == "collect_masked_vectors" and context.node_id == 3:
            metrics = reply.content.config_records["fitres.metrics"]  # the legacy API's metrics of a fit
            metrics.update({"device": 1.0, "train-time-train": 3e38, "val-mean-dice": 1.0, "train-ok": 1.0})
        return reply

    run_inproc(server_app, app, tiny_run_config(tmp_path, **SECAGG_RUN), nodes())
    record = _records(tmp_path / "run")[1]
    assert "skipped" not in record
    sites = list(record["sites"].values())
    assert sum("train-ok" in s for s in sites) == 1  # node 3's metrics arrived, and a plain one was kept
    assert not any(s.get("device") == 1.0 or "val-mean-dice" in s for s in sites)
    assert all(s.get("train-time-train", 0.0) < 1e6 for s in sites)


@pytest.mark.slow
def test_a_site_that_requires_secure_aggregation_trains_under_it_and_sits_out_a_run_without(tmp_path):
    """Node 3 requires SecAgg+ among 3 nodes (require-secagg=3). With secagg=true every site trains and the round
    aggregates all three; in a run without it, node 3 refuses each train message before any work, and the other
    two aggregate without it."""
    strict = [{**config, "require-secagg": 3 if config["partition-id"] == 2 else 0} for config in nodes()]
    run_inproc(server_app, client_app, tiny_run_config(tmp_path / "secagg", **SECAGG_RUN), strict)
    record = _records(tmp_path / "secagg" / "run")[1]
    assert "skipped" not in record and not record["failures"] and set(by_name(record)) == {"site-1", "site-2", "site-3"}
    plain = {k: v for k, v in SECAGG_RUN.items() if k != "secagg"}
    run_inproc(server_app, client_app, tiny_run_config(tmp_path / "plain", **plain), strict)
    record = _records(tmp_path / "plain" / "run")[1]
    assert "skipped" not in record and [f["stage"] for f in record["failures"]] == ["train"]
    assert record["failures"][0]["reason"].startswith("node refused: this site sends its update only under secure")
    assert {name: "train-loss" in site for name, site in by_name(record).items()} == {
        "site-1": True,
        "site-2": True,
        "site-3": False,  # site 3 still validated the round's model
    }


def test_a_node_sends_one_masked_update_a_round_so_a_replayed_round_cannot_single_it_out(tmp_path, monkeypatch):
    """A node trained again for the same round, from the same state, sends the same update: a coordinator that ran a
    round's SecAgg+ twice, over groups that differ in one node, would read that node's update off the two sums. Each
    node sends one masked update a round of a run, and refuses the second request before it trains."""
    from server.report import RunFailed
    from server.secagg import RoundSafeSecAgg
    from server.secagg_grid import CheckedGrid

    once, sending, refusals = RoundSafeSecAgg.__call__, CheckedGrid.send_and_receive, []

    def twice(self, grid, context):  # the round's protocol run a second time, with the same fit instructions
        once(self, grid, context)
        once(self, grid, context)

    def kept(self, messages, *, timeout=None):
        replies = sending(self, messages, timeout=timeout)
        refusals.extend(r.error.reason for r in replies if r.has_error())
        return replies

    monkeypatch.setattr(RoundSafeSecAgg, "__call__", twice)
    monkeypatch.setattr(CheckedGrid, "send_and_receive", kept)
    import client.site

    trained, plain_round = [], client.site.local_round

    def counted_round(context, *args):
        result = plain_round(context, *args)
        trained.append(context.node_id)
        return result

    monkeypatch.setattr(client.site, "local_round", counted_round)
    with pytest.raises(RunFailed, match="no round aggregated"):  # the second run of round 1 halts, and is recorded
        run_inproc(server_app, client_app, tiny_run_config(tmp_path, **SECAGG_RUN), nodes())
    assert sorted(trained) == [1, 2, 3]  # each node trained once: the second request was refused before its data
    again = "node refused: this node answered round 1 of this run for its update already"
    assert len(refusals) == 3 and all(again in reason for reason in refusals), refusals
    skipped = _records(tmp_path / "run")[1]["skipped"]
    assert skipped.startswith("secure aggregation failed (RuntimeError: too few nodes left after its masked updates")
