"""What the run config alone decides: the settings a run cannot start with, refused before the server asks any node
anything (:func:`server.app.main`), and before a site approves a plan of them (``deploy/approval.py``)."""

from __future__ import annotations

from mstkd.errors import InputError
from mstkd.runconfig import RunConfig, project_config
from server.privacy import privacy_settings
from server.strategy import strategy_options


def check_run_config(run: RunConfig) -> dict:
    """Refuse settings the run cannot start with; return its privacy settings (:func:`server.privacy.privacy_settings`,
    empty without differential privacy).

    Raises:
        InputError: one line: a combination the server refuses (``secagg-peers`` without ``secagg``; ``site-cases``
            under SecAgg+ without ``secagg-peers``; SecAgg+ with ``resume-from`` or ``dp``, or among fewer than 3
            nodes; a strategy or DP setting that cannot work), or ``overrides`` the project config does not take.
    """
    if run.secagg_peers and not run.secagg:  # a check the coordinator believes in, which would not run
        raise InputError("secagg-peers checks the nodes' SecAgg+ round keys: it needs secagg=true")
    if run.site_cases and run.secagg and not run.secagg_peers:
        raise InputError("site-cases under SecAgg+ knows a node's key from its signed round keys: give secagg-peers")
    project_config(run)
    privacy = privacy_settings(run)
    strategy_options(run, run.min_nodes)
    if run.secagg and (run.resume_from or privacy):
        raise InputError("secagg=true cannot be combined with resume-from or dp")
    if run.secagg and run.min_nodes < 3:
        raise InputError(f"secure aggregation needs min-nodes >= 3 (key shares among the others), got {run.min_nodes}")
    return privacy
