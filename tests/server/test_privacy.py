"""Differential privacy settings and the privacy ledger (server.privacy)."""

from __future__ import annotations

import pytest

from mstkd.errors import InputError
from mstkd.runconfig import RunConfig


def test_dp_max_epsilon_without_noise_is_refused():
    from server.privacy import privacy_settings

    with pytest.raises(InputError, match="dp-max-epsilon needs dp-noise"):
        privacy_settings(RunConfig.parse({"dp": "server", "dp-noise": 0.0, "dp-max-epsilon": 3.0, "min-nodes": 3}))


def test_the_privacy_ledger_survives_a_server_restart():
    from server.privacy import PrivacyLedger, privacy_settings

    privacy = privacy_settings(RunConfig.parse({"dp": "client", "dp-clip": 1.0, "dp-noise": 2.0, "min-nodes": 3}))
    first = PrivacyLedger(privacy, 3)
    first.release()
    resumed = PrivacyLedger(privacy, 3, state=first.state())  # what ServerCheckpoint carries
    assert resumed.release()["epsilon"] == pytest.approx(first.release()["epsilon"])
    assert resumed.release()["releases"] == 3


def test_a_dp_run_resumes_only_from_a_state_whose_account_fits_it():
    """Resuming with noise from a run without it would count only the resumed rounds: the epsilon reported, and
    dp-max-epsilon, would ignore every model released before. A state of another population is refused too."""
    from server.privacy import PrivacyLedger, privacy_settings

    privacy = privacy_settings(RunConfig.parse({"dp": "server", "dp-clip": 1.0, "dp-noise": 2.0, "min-nodes": 3}))
    with pytest.raises(InputError, match="released without privacy accounting"):
        PrivacyLedger(privacy, 3, state={})  # what a run without dp saves
    earlier = PrivacyLedger(privacy, 4)
    earlier.release()
    with pytest.raises(InputError, match="privacy account was kept for another number of sites"):
        PrivacyLedger(privacy, 3, state=earlier.state())
    limited = {"dp": "server", "dp-clip": 1.0, "dp-noise": 2.0, "min-nodes": 3, "dp-max-epsilon": 5.0}
    stopped = PrivacyLedger(privacy_settings(RunConfig.parse(limited)), 3)
    spent = stopped.release()["epsilon"]
    raised = privacy_settings(RunConfig.parse(limited | {"dp-max-epsilon": 10.0}))  # a run resumed with more budget
    assert PrivacyLedger(raised, 3, state=stopped.state()).release()["epsilon"] > spent
    assert PrivacyLedger(privacy, 3).release()["releases"] == 1  # a fresh run has no state to check
