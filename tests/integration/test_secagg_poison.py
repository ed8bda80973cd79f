"""A hostile node under SecAgg+, in process: the server sees only the unmasked average, which must be no longer than
the lengths the nodes claim allow (server.secagg_average.allowed_update)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import parameters_to_ndarrays

from messages.clipping import update_norm
from server.app import app as server_app
from tests.helpers import nodes, run_inproc, tiny_run_config
from tests.helpers import run_records as _records
from tests.integration.test_privacy import SECAGG_RUN, _secagg_liars

HOSTILE = 3


def _shifted_by(steps: int):
    """A masked-vectors reply whose every masked weight (the weight factor left alone) is ``steps`` quantisation
    steps higher: the masks still cancel, the weight check passes, and the unmasked sum is moved by that much."""
    from flwr.compat.common.parameter import bytes_to_ndarray, ndarray_to_bytes

    def lie(honest):
        factor, *vectors = honest["masked_params"]
        moved = []
        for raw in vectors:
            vector = bytes_to_ndarray(raw)
            moved.append(ndarray_to_bytes(((vector.astype(np.int64) + steps) % 2**32).astype(vector.dtype)))
        return {**honest, "masked_params": [factor, *moved]}

    return lie


def _hostile_app(steps: int, claim: float | None = None, rounds: frozenset[int] = frozenset({1})):
    """The node app, but node ``HOSTILE`` shifts its masked update by ``steps`` in ``rounds`` and, with ``claim``,
    says its update is that long (``update-norm``, sent in the clear beside it)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    shifting = _secagg_liars(
        {HOSTILE: "collect_masked_vectors-shift"}, {"collect_masked_vectors-shift": _shifted_by(steps)}
    )
    honest = _secagg_liars({})

    def app(msg, context):
        record = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if context.node_id != HOSTILE or msg.metadata.group_id not in {str(r) for r in rounds}:
            return honest(msg, context)
        asked = record.get(Key.STAGE) if record is not None else None
        reply = shifting(msg, context)
        if claim is not None and asked == "collect_masked_vectors" and reply.has_content():
            reply.content.config_records["fitres.metrics"]["update-norm"] = claim
        return reply

    return app


@pytest.mark.slow
def test_a_node_that_masks_another_update_than_it_describes_loses_the_round_not_the_model(tmp_path):
    """Node 3 adds 2**20 steps (4.0) to every weight of its masked update in round 2: the masks cancel and its weight
    factor is true, so no earlier check saw it, and the round's model moved by about 2400 against the honest nodes'
    1 (the global evaluation collapsed). The average is now measured against the lengths the nodes claim: round 2 is
    skipped and its model kept, while rounds 1 and 3, honest, aggregate within their claims (round 3's from the model
    round 1 made, which the server sends as float64 and the nodes read as float32)."""
    run_config = tiny_run_config(tmp_path, **{**SECAGG_RUN, "num-server-rounds": 3})
    run_inproc(server_app, _hostile_app(2**20, rounds=frozenset({2})), run_config, nodes())
    records = _records(tmp_path / "run")
    for honest in (1, 3):
        assert "skipped" not in records[honest] and "global" in records[honest]
        moved = records[honest]["secagg-update"]
        assert 0 < moved["norm"] <= moved["claims"] == moved["bound"] and "scaled" not in moved
    hostile = records[2]
    assert hostile["skipped"].startswith("secure aggregation failed (ValueError: the unmasked average moved the model")
    assert hostile["secagg-update"]["norm"] > 100 * hostile["secagg-update"]["claims"]
    assert hostile["model_norm"] == pytest.approx(records[1]["model_norm"])  # the model kept
    assert records[3]["model_norm"] < 2 * records[1]["model_norm"]


@pytest.mark.slow
@pytest.mark.parametrize("bound", [0.0, 3.0])
def test_with_update_bound_a_long_claim_moves_the_model_by_at_most_k_typical_updates(tmp_path, monkeypatch, bound):
    """Node 3 shifts its masked update by 2**17 steps and claims an update of 1e6 to cover it. Its claim alone lets
    that through (without update-bound the round aggregates, moved by far more than the honest nodes' updates); with
    update-bound 3 its claim counts for 3 times the lower median of the claims, and the average's update is scaled
    down to what the cut claims allow: no single update can be told or scaled under SecAgg+."""
    from server.secagg_average import CheckedFedAvg

    sent, made, aggregate = {}, {}, CheckedFedAvg.aggregate_fit

    def aggregate_and_keep(self, *args):  # the model the round sent, and the one it made (student and discriminator)
        parameters, metrics = aggregate(self, *args)
        sent.update(zip(self.names, self.sent, strict=True))
        made.update(zip(self.names, parameters_to_ndarrays(parameters), strict=True))
        return parameters, metrics

    monkeypatch.setattr(CheckedFedAvg, "aggregate_fit", aggregate_and_keep)
    run_config = tiny_run_config(tmp_path, **{**SECAGG_RUN, "update-bound": bound})
    run_inproc(server_app, _hostile_app(2**17, claim=1e6), run_config, nodes())
    record = _records(tmp_path / "run")[1]
    honest = [s["update-norm"] for s in record["sites"].values() if s["update-norm"] < 1e6]
    moved = record["secagg-update"]
    assert len(honest) == 2 and moved["norm"] > 10 * max(honest) and "skipped" not in record
    if not bound:
        assert "claims-bounded" not in record and "scaled" not in moved and moved["bound"] == moved["claims"]
        return
    (cut,) = record["claims-bounded"]
    assert cut["site"] == "site-3" and cut["claimed"] == 1e6
    assert cut["limit"] == pytest.approx(3 * max(honest))  # the lower median of three claims: the longer honest one
    assert moved["scaled"] and moved["bound"] <= cut["limit"] + 1e-3 < moved["norm"]
    assert update_norm(sent, made) == pytest.approx(moved["bound"], rel=1e-6)  # the whole model, scaled to the bound
    from mstkd.checkpoint import load_checkpoint

    kept = load_checkpoint(tmp_path / "run" / "last.pt")[0].state_dict()
    assert all(np.allclose(v.numpy(), made[f"student.{k}"], atol=1e-6) for k, v in kept.items())  # and saved
    report = (tmp_path / "run" / "REPORT.md").read_text()
    assert "a node calling itself site-3 claimed an update of norm 1e+06, counted as update-bound's" in report
    assert "the unmasked average's update (norm" in report and "scaled down to update-bound's" in report
