"""Differential privacy settings and the privacy ledger (server.privacy)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest

from mstkd.errors import InputError
from mstkd.runconfig import RunConfig


def test_dp_max_epsilon_without_noise_is_refused():
    from server.privacy import privacy_settings

    with pytest.raises(InputError, match="dp-max-epsilon needs dp-noise"):
        privacy_settings(RunConfig.parse({"dp": "server", "dp-noise": 0.0, "dp-max-epsilon": 3.0, "min-nodes": 3}))


def _released(ledger, server_round: int) -> dict:
    """What the account came to with the round's release (``PrivacyLedger.release`` keeps it for the round's record)."""
    ledger.release(server_round)
    return ledger.spent[server_round]


@pytest.mark.parametrize("delta,nodes", [(0.5, 3), (1 / 3, 3), (0.1, 10)])
def test_a_delta_that_guarantees_nothing_is_refused(delta, nodes):
    """(0, 1/n)-DP is met by releasing one of n sites' updates whole, picked at random: its epsilon says nothing."""
    from server.privacy import privacy_settings

    with pytest.raises(InputError, match=r"dp-delta=.* is at least 1 / min-nodes"):
        privacy_settings(RunConfig.parse({"dp": "server", "dp-noise": 1.0, "min-nodes": nodes, "dp-delta": delta}))
    assert privacy_settings(RunConfig.parse({"dp": "server", "dp-noise": 1.0, "min-nodes": nodes, "dp-delta": 0.01}))


def test_the_privacy_ledger_survives_a_server_restart():
    from server.ledger import PrivacyLedger
    from server.privacy import privacy_settings

    privacy = privacy_settings(RunConfig.parse({"dp": "client", "dp-clip": 1.0, "dp-noise": 2.0, "min-nodes": 3}))
    first = PrivacyLedger(privacy, 3)
    _released(first, 1)
    resumed = PrivacyLedger(privacy, 3, state=first.state())  # what ServerCheckpoint carries
    assert _released(resumed, 2)["epsilon"] == pytest.approx(_released(first, 2)["epsilon"])
    assert _released(resumed, 3)["releases"] == 3


def test_a_dp_run_resumes_only_from_a_state_whose_account_fits_it():
    """Resuming with noise from a run without it would count only the resumed rounds: the epsilon reported, and
    dp-max-epsilon, would ignore every model released before. A state of another dp-delta is refused too; one
    kept while another number of nodes was connected is not (without amplification epsilon does not depend on it:
    that refusal only pushed operators to resume without dp)."""
    from server.ledger import PrivacyLedger
    from server.privacy import privacy_settings

    privacy = privacy_settings(RunConfig.parse({"dp": "server", "dp-clip": 1.0, "dp-noise": 2.0, "min-nodes": 3}))
    with pytest.raises(InputError, match="released without privacy accounting"):
        PrivacyLedger(privacy, 3, state={})  # what a run without dp saves
    earlier = PrivacyLedger(privacy, 4)
    once = _released(earlier, 1)["epsilon"]
    assert _released(PrivacyLedger(privacy, 3, state=earlier.state()), 2)["releases"] == 2
    assert _released(PrivacyLedger(privacy, 5, state=earlier.state()), 2)["epsilon"] > once
    other_delta = privacy_settings(RunConfig.parse({"dp": "server", "dp-noise": 2.0, "min-nodes": 3, "dp-delta": 1e-6}))
    with pytest.raises(InputError, match="another dp-delta"):
        PrivacyLedger(other_delta, 3, state=earlier.state())
    limited = {"dp": "server", "dp-clip": 1.0, "dp-noise": 2.0, "min-nodes": 3, "dp-max-epsilon": 5.0}
    stopped = PrivacyLedger(privacy_settings(RunConfig.parse(limited)), 3)
    spent = _released(stopped, 1)["epsilon"]
    raised = privacy_settings(RunConfig.parse(limited | {"dp-max-epsilon": 10.0}))  # a run resumed with more budget
    assert _released(PrivacyLedger(raised, 3, state=stopped.state()), 2)["epsilon"] > spent
    assert _released(PrivacyLedger(privacy, 3), 1)["releases"] == 1  # a fresh run has no state to check


def _checkpoint(round: int, ledger, key: str = "run.k", records: dict | None = None):
    """What resume-from reads of the server's state: its round, account, records and the nodes' state key."""
    return SimpleNamespace(round=round, privacy=ledger.state(), records=records or {}, state_key=key)


@pytest.mark.parametrize("later", ["off", "no noise"])
def test_a_dp_run_cannot_be_resumed_without_its_noise(tmp_path, later):
    """Resuming a DP run with dp='off' was taken: its later rounds released models without clipping or noise while
    REPORT.md still showed the epsilon of the rounds before, and the account was dropped from the saved state."""
    from server.ledger import PrivacyLedger, resumed_account
    from server.privacy import privacy_settings

    privacy = privacy_settings(RunConfig.parse({"dp": "server", "dp-clip": 1.0, "dp-noise": 1.0, "min-nodes": 3}))
    ledger = PrivacyLedger(privacy, 3, folder=tmp_path, key="run.k")
    ledger.release(1)
    checkpoint = _checkpoint(1, ledger, records={1: {"privacy": {**privacy, **ledger.spent[1]}}})
    values = {"dp": "off"} if later == "off" else {"dp": "server", "dp-noise": 0.0, "min-nodes": 3}
    message = "resume it with the same dp settings" if later == "off" else "resuming with dp-noise 0"
    with pytest.raises(InputError, match=message):
        resumed_account(privacy_settings(RunConfig.parse(values)), tmp_path, checkpoint)
    assert resumed_account(privacy, tmp_path, checkpoint) == ledger.state()
    (tmp_path / PrivacyLedger.FILE).write_text('{"round": ')
    with pytest.raises(InputError, match="privacy.json does not read"):
        resumed_account(privacy, tmp_path, checkpoint)


def test_an_account_file_counts_only_for_its_own_run_and_a_later_release(tmp_path):
    """The account file written at a release is read on resume only when it is the same run's (its state key) and
    counts more releases than the server's state: after overwrite=true, an earlier run's file in the folder gave a
    new run that run's account (or refused to resume a run without dp at all)."""
    from server.ledger import PrivacyLedger, resumed_account
    from server.privacy import privacy_settings
    from server.runfolder import claim_folder

    privacy = privacy_settings(RunConfig.parse({"dp": "server", "dp-clip": 1.0, "dp-noise": 1.0, "min-nodes": 3}))
    earlier = PrivacyLedger(privacy, 3, folder=tmp_path, key="earlier.k")
    for r in range(1, 11):
        earlier.release(r)
    later = PrivacyLedger(privacy, 3, folder=None)
    later.release(1)
    assert resumed_account(privacy, tmp_path, _checkpoint(1, later, key="later.k")) == later.state()
    without_dp = SimpleNamespace(round=1, privacy={}, records={}, state_key="plain.k")  # a run without dp
    assert resumed_account({}, tmp_path, without_dp) == {}
    stale = _checkpoint(10, earlier, key="earlier.k")  # the file is as old as the server's state: nothing later
    assert resumed_account(privacy, tmp_path, stale) == earlier.state()
    (tmp_path / "metrics.jsonl").write_text("")
    claim_folder(tmp_path, overwrite=True)  # overwrite=true removes it with the run's other files
    assert not (tmp_path / PrivacyLedger.FILE).exists()


def test_the_servers_own_account_counts_the_releases_of_every_copy_of_a_run_resumed_on_it(tmp_path):
    """A run resumed from a copy of round 5 (copy A) runs to round 10; resumed again from another copy of round 5
    (copy B), its server's own account says 10 releases at round 10, and then, after B's round 6, 11 at round 6.
    A third copy, of round 8, must still continue from 11: the account is compared by releases, not by round."""
    from server.ledger import PrivacyLedger, home_file, resumed_account
    from server.privacy import privacy_settings

    privacy = privacy_settings(RunConfig.parse({"dp": "server", "dp-clip": 1.0, "dp-noise": 1.0, "min-nodes": 3}))
    home, key = tmp_path / "home", "run.k"

    def copy(rounds: int):  # the run's own state as a copy of its folder holds it after ``rounds`` rounds
        ledger = PrivacyLedger(privacy, 3)
        for r in range(1, rounds + 1):
            ledger.release(r)
        return _checkpoint(rounds, ledger, key=key)

    a = PrivacyLedger(privacy, 3, state=copy(5).privacy, key=key, home=home)
    for r in range(6, 11):
        a.release(r)
    account = resumed_account(privacy, tmp_path / "b", copy(5), home)
    assert account == a.state() and resumed_account(privacy, tmp_path / "b", copy(5)) == copy(5).privacy
    b = PrivacyLedger(privacy, 3, state=account, key=key, home=home)
    b.release(6)
    assert '"round": 6' in home_file(home, key).read_text()
    assert (
        _released(PrivacyLedger(privacy, 3, resumed_account(privacy, tmp_path / "c", copy(8), home)), 9)["releases"]
        == 12
    )
    assert resumed_account(privacy, tmp_path / "d", _checkpoint(8, a, key="other.k"), home) == a.state()  # not ours


def test_the_servers_copy_of_the_account_is_kept_in_a_private_folder_or_the_run_is_refused_before_any_round(
    tmp_path,
):
    from server.ledger import PrivacyLedger
    from server.privacy import privacy_settings

    privacy = privacy_settings(RunConfig.parse({"dp": "server", "dp-clip": 1.0, "dp-noise": 1.0, "min-nodes": 3}))
    (tmp_path / "afile").write_text("")
    with pytest.raises(InputError, match="afile is a file, not a folder"):
        PrivacyLedger(privacy, 3, key="run.k", home=tmp_path / "afile")
    (tmp_path / "open" / "privacy").mkdir(parents=True)
    (tmp_path / "open" / "privacy").chmod(0o777)  # anyone could replace the account
    with pytest.raises(InputError, match="others may write to .*open/privacy .mode 777.*chmod 700"):
        PrivacyLedger(privacy, 3, key="run.k", home=tmp_path / "open")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "privacy").symlink_to(tmp_path / "open" / "privacy")
    with pytest.raises(InputError, match="linked/privacy is a link"):
        PrivacyLedger(privacy, 3, key="run.k", home=tmp_path / "linked")
    PrivacyLedger(privacy, 3, key="run.k", home=tmp_path / "home").release(1)
    assert (tmp_path / "home" / "privacy").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "home" / "privacy" / "run.k.json").is_file()


def test_accounts_that_disagree_or_do_not_read_are_one_line_and_a_missing_copy_a_warning(tmp_path, caplog):
    """Two accounts of one run that each count releases the other does not (resumed on two servers, or with another
    dp-noise) were settled by the larger count, which may not be the larger epsilon; a crafted count of Infinity or
    JSON nested 10^6 deep ended the resume in a traceback."""
    from server.ledger import PrivacyLedger, home_file, resumed_account
    from server.privacy import privacy_settings

    def dp(noise: float) -> dict:
        return privacy_settings(RunConfig.parse({"dp": "server", "dp-clip": 1.0, "dp-noise": noise, "min-nodes": 3}))

    start = PrivacyLedger(dp(1.0), 3)
    start.release(1)
    here = PrivacyLedger(dp(1.0), 3, state=start.state(), folder=tmp_path / "run", key="run.k")
    (tmp_path / "run").mkdir()
    for r in (2, 3):
        here.release(r)
    there = PrivacyLedger(dp(3.0), 3, state=start.state(), key="run.k", home=tmp_path / "home")
    for r in (2, 3, 4):
        there.release(r)
    with pytest.raises(InputError, match="each count releases the other does not"):
        resumed_account(dp(1.0), tmp_path / "run", _checkpoint(1, start), tmp_path / "home")
    home_file(tmp_path / "home", "run.k").unlink()
    assert resumed_account(dp(1.0), tmp_path / "run", _checkpoint(1, start), tmp_path / "home") == here.state()
    assert "this server kept no copy of the run's privacy account" in caplog.text
    for crafted in ('{"round": 3, "key": "run.k", "account": {"compositions": [{"count": Infinity}]}}', "[" * 10**6):
        home_file(tmp_path / "home", "run.k").write_text(crafted)
        with pytest.raises(InputError, match=r"home/privacy/run.k.json does not read"):
            resumed_account(dp(1.0), tmp_path / "run", _checkpoint(1, start), tmp_path / "home")


def test_a_release_counted_before_a_restart_shows_in_the_next_rounds_record(tmp_path, task_identity):
    """A release restored from the account file belongs to no round's record; a round after the resume that is
    skipped carried no epsilon, so the report's table ended below what was spent. It now carries the spent so far."""
    from server.evaluation import RoundEnd
    from server.ledger import PrivacyLedger
    from server.privacy import privacy_settings

    privacy = privacy_settings(RunConfig.parse({"dp": "server", "dp-clip": 1.0, "dp-noise": 1.0, "min-nodes": 3}))
    before = PrivacyLedger(privacy, 3)
    for r in (1, 2):
        before.release(r)  # round 2 counted, then the server stopped before its end
    ledger = PrivacyLedger(privacy, 3, state=before.state())
    rec = {"skipped": "1 of 3 nodes connected after 600 s"}
    RoundEnd._privacy(SimpleNamespace(ledger=ledger, privacy=privacy, clipping_norm=None), 2, rec)
    assert rec["privacy"]["releases"] == 2 and rec["privacy"]["epsilon"] == pytest.approx(before.so_far()["epsilon"])


def test_a_release_is_counted_before_it_leaves_the_server(tmp_path, task_identity):
    """The new global model went to the nodes for site validation (and into last.pt) before it was counted, and the
    account reached disk only with the server's state at the round's end. A server stopped in between resumed with
    the release uncounted and ran the round again with fresh noise: two releases, one counted."""
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    from server.app import WAIT_ELSEWHERE
    from server.ledger import PrivacyLedger, resumed_account
    from server.loop import run_rounds
    from server.privacy import privacy_settings, wrap_for_privacy
    from server.runlog import RunLog
    from server.strategy import make_strategy

    class Stopped(BaseException):
        """The server is killed."""

    class Grid:
        def get_node_ids(self):
            return [1, 2, 3]

        def send_and_receive(self, messages, timeout=None):
            replies = []
            for m in messages:
                if m.metadata.message_type == MessageType.EVALUATE:
                    if m.content["config"]["server-round"] == 2:
                        raise Stopped  # round 2's model has reached the nodes
                    continue
                arrays = ArrayRecord({k: Array(v.numpy() + 0.1) for k, v in m.content["arrays"].items()})
                metrics = MetricRecord({"num-examples": 4, "train-loss": 1.0})
                replies.append(Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=m))
            return replies

    run = RunConfig.parse({"dp": "server", "dp-clip": 1.0, "dp-noise": 1.0, "min-nodes": 3, "transport": "float32"})
    privacy, runlog = privacy_settings(run), RunLog(tmp_path)
    strategy = wrap_for_privacy(make_strategy(run, runlog=runlog, nodes=3, **WAIT_ELSEWHERE), privacy)
    ledger, saved = PrivacyLedger(privacy, 3, folder=tmp_path, key="run.k"), {}
    start = ArrayRecord({"student.w": Array(np.zeros(8, np.float32)), "disc.w": Array(np.zeros(2, np.float32))})
    with pytest.raises(Stopped):
        run_rounds(
            strategy, Grid(), arrays=start, first_round=1, num_rounds=3, runlog=runlog, train_config={}, timeout=1,
            min_nodes=3, min_replies=1, node_wait=0, on_release=ledger.release,
            after_round=lambda r, arrays: saved.setdefault("checkpoint", _checkpoint(r, ledger)),
        )  # fmt: skip
    assert saved["checkpoint"].round == 1  # the server's state, as resume-from reads it
    resumed = PrivacyLedger(privacy, 3, state=resumed_account(privacy, tmp_path, saved["checkpoint"]))
    assert _released(resumed, 2)["releases"] == 3  # round 1, round 2 before the stop, round 2 again


def test_sites_that_clip_move_the_release_by_at_most_clip_over_nodes_whatever_the_transport(tmp_path, task_identity):
    """Under dp='client' the sites clip against the model as they received it (float16 by default), but the release
    was built on the float32 model: a site then moved it by (clip + |float16 - float32 model|) / min-nodes, past
    what the noise covers (x1.135 at dp-clip 0.1 on the lite network)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    start = {"student.w": np.full(4, 1000.3, np.float32)}  # 1000.5 in float16: 0.2 off in each weight
    u = {"student.w": np.full(4, 0.5)}  # norm 1 = dp-clip, along the rounding

    def release(replying: int) -> np.ndarray:
        strategy = _dp_strategy(tmp_path, "client", transport="float16")
        sent = list(
            strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in start.items()}), ConfigRecord(), _Nodes(3))
        )
        replies = []
        for message in sent[:replying]:  # each site: the model it received plus its clipped update
            received = {k: v.numpy().astype(np.float64) for k, v in message.content["arrays"].items()}
            arrays = ArrayRecord({k: Array((received[k] + u[k]).astype(np.float32)) for k in start})
            content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 4})})
            replies.append(Message(content, reply_to=message))
        released, _ = strategy.aggregate_train(1, replies)
        return released["student.w"].numpy().astype(np.float64)

    moved = np.linalg.norm(release(3) - release(2))  # one site more
    assert moved <= 1.0 / 3 + 1e-3, moved  # float32 rounding at 1000: 6e-5 a weight


class _Nodes:
    """A grid of connected nodes whose messages are only built, never sent."""

    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self):
        return list(range(1, self.count + 1))


def _dp_strategy(tmp_path, mode: str, clipping: str = "fixed", **extra):
    from server.app import WAIT_ELSEWHERE
    from server.privacy import privacy_settings, wrap_for_privacy
    from server.runlog import RunLog
    from server.strategy import make_strategy

    values = {"dp": mode, "dp-clipping": clipping, "dp-clip": 1.0, "dp-noise": 0.0, "min-nodes": 3, **extra}
    run = RunConfig.parse({"transport": "float32", **values})
    inner = make_strategy(run, runlog=RunLog(tmp_path), nodes=3, **WAIT_ELSEWHERE)
    return wrap_for_privacy(inner, privacy_settings(run))


def _dp_round(strategy, start, updates, connected=5, bits=None):
    """One round from ``start`` (by name) in which the nodes asked first reply ``start + update`` each; the nodes
    asked and the released arrays (None when nothing is aggregated)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), _Nodes(connected)))
    replies = []
    for i, (message, update) in enumerate(zip(sent, updates, strict=False)):
        metrics = {"num-examples": 4 + i, **({"norm_bit": bits[i]} if bits is not None else {})}
        arrays = ArrayRecord({k: Array((v + update[k]).astype(np.float32)) for k, v in start.items()})
        replies.append(Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=message))
    released, _ = strategy.aggregate_train(1, replies)
    return sent, None if released is None else {k: v.numpy().astype(np.float64) for k, v in released.items()}


@pytest.mark.parametrize("mode", ["server", "client"])
def test_a_dp_round_divides_by_min_nodes_whoever_replies(tmp_path, mode, task_identity, caplog):
    """The noise covers one site moving the release by dp-clip / min-nodes. Flower's wrappers averaged the replies
    that came, so a round needed all of them (one failing node stopped a DP run), and a round that asked more nodes
    than min-nodes let one site move it further. Now at most min-nodes nodes are asked and the sum of the clipped
    updates that came is divided by min-nodes; an update of norm 0 (a node echoing the model) no longer makes the
    server's clipping divide by zero."""
    start = {"student.w": np.zeros(4, np.float32), "disc.w": np.ones(2, np.float32)}
    u = {"student.w": np.array([0.6, 0.0, 0.0, 0.0]), "disc.w": np.array([0.0, 0.8])}  # norm 1 = dp-clip
    zero = {k: np.zeros_like(v) for k, v in u.items()}
    underflow = {"student.w": np.array([1e-23, 0.0, 0.0, 0.0]), "disc.w": np.zeros(2)}  # its square is 0 in float32
    minus = {k: -v for k, v in u.items()}
    sent, three = _dp_round(_dp_strategy(tmp_path, mode), start, [u, u, u])
    assert len(sent) == 3  # of 5 connected
    for k in start:
        np.testing.assert_allclose(three[k], start[k] + u[k], atol=1e-6)  # every node asked replied: the mean
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, two = _dp_round(_dp_strategy(tmp_path, mode), start, [u, u])
    assert "could impact the differential privacy" not in caplog.text  # Flower's warning, untrue here
    _, echoed = _dp_round(_dp_strategy(tmp_path, mode), start, [u, u, zero])
    _, underflown = _dp_round(_dp_strategy(tmp_path, mode), start, [u, u, underflow])
    _, flipped = _dp_round(_dp_strategy(tmp_path, mode), start, [u, u, minus])
    for k in start:
        np.testing.assert_allclose(two[k], start[k] + 2 * u[k] / 3, atol=1e-6)
        np.testing.assert_allclose(echoed[k], two[k], atol=1e-6)
        np.testing.assert_allclose(underflown[k], two[k], atol=1e-6)
    for released in (three, flipped):  # one site more or less, or another in its place: at most dp-clip / 3
        moved = np.sqrt(sum(((released[k] - two[k]) ** 2).sum() for k in start))
        assert moved <= 1.0 / 3 + 1e-6
    if mode == "server":  # the server clips: an update ten times too long counts as one of norm dp-clip
        long = {k: 10 * v for k, v in u.items()}
        _, clipped = _dp_round(_dp_strategy(tmp_path, mode), start, [u, u, long])
        for k in start:
            np.testing.assert_allclose(clipped[k], three[k], atol=1e-6)
    assert _dp_round(_dp_strategy(tmp_path, mode), start, [zero])[1] is None  # nothing moved: nothing released


@pytest.mark.parametrize("mode", ["server", "client"])
def test_adaptive_clippings_count_is_centred_and_a_missing_node_counts_half(tmp_path, mode, monkeypatch, task_identity):
    """Andrew et al. count each bit minus 1/2, so that one site moves the noisy count by 1/2, as the split of the
    noise between the updates and the count assumes; the count was uncentred (one site moved it by 1), and a node
    that did not reply counted as not clipped, which shrank the norm however many updates were clipped."""
    import server.privacy as privacy

    monkeypatch.setattr(privacy._UnpredictableNoise, "_rng", staticmethod(lambda: np.random.default_rng(0)))
    start = {"student.w": np.zeros(4, np.float32)}
    long = {"student.w": np.array([5.0, 0.0, 0.0, 0.0])}  # clipped at the first norm, 1
    shares = {}
    for replying in (3, 2):
        strategy = _dp_strategy(tmp_path, mode, "adaptive", **{"dp-clip-quantile": 0.5, "dp-count-noise": 1e-9})
        real, seen = strategy._noisy_fraction, []

        def recorded(count, total, real=real, seen=seen):
            seen.append(real(count, total))
            return seen[-1]

        strategy._noisy_fraction = recorded
        _dp_round(strategy, start, [long] * replying, bits=[1] * replying)
        shares[replying] = seen[0]
        if replying == 2:  # two of three clipped, the third half: the norm grows, as it should
            assert strategy.clipping_norm > 1.0
    assert shares[3] == pytest.approx(1.0) and shares[2] == pytest.approx(2.5 / 3)


def test_dp_with_a_server_optimiser_is_refused():
    """Flower adds the noise after the server optimiser, whose momentum or moments would hold the sites' average
    without noise and carry it into later rounds and the server's saved state."""
    from server.privacy import privacy_settings

    for strategy in ("fedavgm", "fedadam", "fedyogi"):
        with pytest.raises(InputError, match="use fedavg or fedprox with differential privacy"):
            privacy_settings(RunConfig.parse({"dp": "server", "strategy": strategy, "min-nodes": 3}))
    assert (
        privacy_settings(RunConfig.parse({"dp": "server", "strategy": "fedprox", "min-nodes": 3}))["mode"] == "server"
    )
