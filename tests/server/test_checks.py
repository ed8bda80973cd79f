"""Settings a run cannot start with (server.checks): refused before the server asks any node anything, the same
rules a site's approval tool applies to a plan (deploy/plans.py check_startable)."""

from __future__ import annotations

import re

import pytest

from client.app import app as client_app
from mstkd.errors import InputError
from mstkd.runconfig import RunConfig
from server.app import app as server_app
from server.checks import check_run_config
from tests.helpers import InProcGrid, nodes, server_context, tiny_run_config

REFUSED = [
    ({"secagg-peers": "peers.pub"}, "secagg-peers checks the nodes' SecAgg+ round keys: it needs secagg=true"),
    ({"secagg": True, "site-cases": "cases.txt"}, "site-cases under SecAgg+ knows a node's key"),
    ({"secagg": True, "dp": "server"}, "secagg=true cannot be combined with resume-from or dp"),
    ({"secagg": True, "resume-from": "runs/old"}, "secagg=true cannot be combined with resume-from or dp"),
    ({"secagg": True, "min-nodes": 2}, "secure aggregation needs min-nodes >= 3"),
    ({"dp": "server", "strategy": "fedadam"}, "use fedavg or fedprox with differential privacy"),
    ({"strategy": "multikrum", "krum-select": 9}, "krum-select=9: more replies than"),
    ({"overrides": "no.such=1"}, "unknown config key"),
    ({"eval-subsets": "flair+bogus"}, "eval-subsets: unknown modality 'bogus'"),
    ({"site-eval-subsets": "bogus"}, "site-eval-subsets: unknown modality 'bogus'"),
    ({"run-name": "a/b"}, "run-name 'a/b.00000000' is not a plain folder name"),
    ({"tracker": "wandb"}, "tracker wandb: choose from"),
]


@pytest.mark.parametrize(("settings", "reason"), REFUSED)
def test_settings_a_run_cannot_start_with_are_refused_before_any_node_is_asked(tmp_path, settings, reason):
    with pytest.raises(InputError, match=re.escape(reason)):
        check_run_config(RunConfig.parse({"min-nodes": 3} | settings))
    run_config = tiny_run_config(tmp_path, **{"min-nodes": 3} | settings)
    grid = InProcGrid(client_app, run_config, nodes())
    with pytest.raises(InputError, match=re.escape(reason)):
        server_app(grid, server_context(grid, run_config))
    assert grid.sent == [] and not (tmp_path / "run").exists()  # nothing asked, nothing written


def test_settings_a_run_can_start_with_pass_and_give_the_privacy_settings():
    assert check_run_config(RunConfig.parse({"secagg": True, "min-nodes": 3})) == {}
    privacy = check_run_config(RunConfig.parse({"dp": "client", "dp-clip": 2.0, "min-nodes": 3}))
    assert privacy["mode"] == "client"
