"""What the run config alone decides: the settings a run cannot start with, refused before the server asks any node
anything (:func:`server.app.main`), and before a site approves a plan of them (``deploy/approval.py``)."""

from __future__ import annotations

from mstkd.errors import InputError
from mstkd.modalities import parse_subsets
from mstkd.runconfig import RunConfig, check_state_key, project_config
from mstkd.tracking import parse_trackers
from server.privacy import privacy_settings
from server.strategy import strategy_options

TOKEN = "0" * 8
"""As long as the token :func:`server.app.main` joins to ``run-name`` (4 random bytes in hex)."""


def check_run_config(run: RunConfig) -> dict:
    """Refuse settings the run cannot start with; return its privacy settings (:func:`server.privacy.privacy_settings`,
    empty without differential privacy).

    Raises:
        InputError: one line: a combination the server refuses (``secagg-peers`` without ``secagg``; ``site-cases``
            under SecAgg+ without ``secagg-peers``; SecAgg+ with ``resume-from`` or ``dp``, or among fewer than 3
            nodes; a strategy or DP setting that cannot work), ``overrides`` the project config does not take,
            modality subsets, a ``run-name`` or trackers that do not read.
    """
    if run.secagg_peers and not run.secagg:  # a check the coordinator believes in, which would not run
        raise InputError("secagg-peers checks the nodes' SecAgg+ round keys: it needs secagg=true")
    if run.site_cases and run.secagg and not run.secagg_peers:
        raise InputError("site-cases under SecAgg+ knows a node's key from its signed round keys: give secagg-peers")
    project_config(run)
    for key, spec in (("eval-subsets", run.eval_subsets), ("site-eval-subsets", run.site_eval_subsets)):
        try:
            parse_subsets(spec)
        except ValueError as exc:
            raise InputError(f"{key}: {exc}") from None
    if run.run_name:  # the nodes' state folders are named after it, with a token of the run's own (server.app)
        check_state_key(f"{run.run_name}.{TOKEN}", "run-name")
    parse_trackers(run.trackers)
    privacy = privacy_settings(run)
    strategy_options(run, run.min_nodes)
    if run.secagg and (run.resume_from or privacy):
        raise InputError("secagg=true cannot be combined with resume-from or dp")
    if run.secagg and run.min_nodes < 3:
        raise InputError(f"secure aggregation needs min-nodes >= 3 (key shares among the others), got {run.min_nodes}")
    return privacy
