"""What a hospital approves: one app version together with the run config it runs under (a plan), and which
checkout a digest was made from.

An approved app (:mod:`deploy.approval`) runs with whatever run config the coordinator submits: the same code
trains with differential privacy or without, for 5 rounds or 5000, scoring one subset of modalities or all 15.
A site that approves a *plan* instead pins both, as OpenFL's collaborators check the plan they signed: the
digest of the app bundle joined with every value of the run config that the node's ClientApp will read (the app's
defaults with the run's ``--run-config`` on top, as Flower fuses them on the node). A run with one value changed
is another plan, and the node refuses it before any of its code is installed. Within a run the ClientApp holds the
server's messages to what the run config sets for the site (``client.app.clip_updates``, ``client.terms``,
``client.site.message_mu``, ``mstkd.data.sites.with_target``); what the server does with the replies no node can
check (docs/deployment.md, "Approve the run's settings too").

    python deploy/approval.py digest . --run-config "num-server-rounds=20 dp='client'"   # prints "plan <digest>"
    python deploy/approval.py approve . --list ~/mstkd/approved.txt --run-config "..."     # adds it to the list

Both print the run config the plan holds (one ``key = value`` a line, on standard error) for the site to review, and
refuse a plan the app would refuse to start (:func:`check_startable`).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PLAN = "plan"  # a list line ``plan <digest>`` approves a plan; a bare digest approves an app with any run config
DOMAIN = b"mstkd plan, v1\0"  # a plan digest is never an app digest, nor one of another kind


def config_text(run_config: Mapping[str, Any]) -> str:
    """The run config in one canonical form: JSON of its keys in order, each value of the type it has (``1``,
    ``1.0``, ``true`` and ``"1"`` differ).

    Raises:
        ValueError: a key that is not a string, or a value that is not a bool, int, float or str (a run config
            holds nothing else).
    """
    for key, value in run_config.items():
        if not isinstance(key, str) or not isinstance(value, bool | int | float | str):
            raise ValueError(f"run config key {str(key)[:80]!r}: a {type(value).__name__} is no run-config value")
    return json.dumps(dict(run_config), sort_keys=True, ensure_ascii=True, separators=(",", ":"))


def plan_digest(app: str, run_config: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the app's digest and the run config's :func:`config_text`, under this module's domain."""
    return hashlib.sha256(DOMAIN + app.encode() + b"\0" + config_text(run_config).encode()).hexdigest()


def plan_line(app: str, run_config: Mapping[str, Any]) -> str:
    """The approval-list entry of the plan (``plan <digest>``)."""
    return f"{PLAN} {plan_digest(app, run_config)}"


def fused_config(fab: bytes, overrides: list[str] | None) -> dict[str, Any]:
    """The run config a node's ClientApp gets for ``flwr run APP --run-config OVERRIDES`` of the bundle ``fab``: the
    bundle's defaults, flattened, with the overrides on top (Flower's own parsing and fusing; each ``--run-config``
    is one string of ``key=value`` pairs, or one TOML file).

    Raises:
        ValueError: overrides Flower cannot read, or a key the app's config does not have (the node would refuse
            the run).
    """
    from flwr.common.config import flatten_dict, fuse_dicts, get_fab_config, parse_config_args

    try:
        given = parse_config_args(overrides or None)
    except Exception as exc:  # a ClickException for a value TOML cannot read, OSError for a missing file
        raise ValueError(f"--run-config: {getattr(exc, 'message', None) or exc}") from None
    defaults = flatten_dict(get_fab_config(fab)["tool"]["flwr"]["app"].get("config", {}))
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"--run-config: the app has no setting {unknown[0]!r}")
    for key, value in given.items():  # Flower sends whole numbers as 64-bit integers: a plan no run could use
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise ValueError(f"--run-config: {key} = {value} is beyond a 64-bit integer, which flwr run refuses")
    return fuse_dicts(defaults, given)


def check_startable(app_dir: Path, run_config: Mapping[str, Any]) -> str:
    """Refuse a plan whose run config the app would refuse at start (:func:`server.checks.check_run_config`: a type,
    a range, a combination such as ``secagg=true`` with ``dp``), so that a site approves no plan that cannot run.
    The rules are those of the checkout this environment imports the project from: they are applied where
    ``app_dir`` is that checkout, and otherwise not (the return value says which).

    Raises:
        ValueError: the run config the app would refuse, in one line.
    """
    import server.checks
    from mstkd.runconfig import RunConfig
    from server.checks import check_run_config

    rules = Path(server.checks.__file__).resolve().parents[1]
    if Path(app_dir).resolve() != rules:
        return f"not checked: this environment's rules are those of {rules}, not of {app_dir}"

    try:
        check_run_config(RunConfig.parse(run_config))
    except ValueError as exc:
        raise ValueError(f"this plan's run config would not start: {exc}") from None
    return "checked against the app's start-up rules"


def described(overrides: list[str] | None) -> str:
    """The ``--run-config`` values as one line of text for an approval list's comment (at most 300 characters)."""
    text = " ".join(" ".join(overrides or []).split())  # every line break and control space becomes one space
    return f"--run-config {text[:280]!r}" + (" ..." if len(text) > 280 else "")


def show(run_config: Mapping[str, Any]) -> str:
    """The run config one ``key = value`` a line (values as JSON, which TOML reads alike), in key order."""
    return "".join(f"{key} = {json.dumps(run_config[key])}\n" for key in sorted(run_config))


def checkout(app_dir: Path) -> str:
    """The checkout's short commit, followed by `` + local changes`` where files differ from it (changed, or
    untracked and not ignored), whose bundle may then differ from a clean checkout's; or, where git cannot say,
    why (``git not found``, or git's own first line, e.g. a checkout another user owns)."""
    git = ["git", "-C", str(app_dir)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        if head.returncode:
            why = (head.stderr.strip().splitlines() or ["not a git checkout"])[0]
            return f"no git commit ({why[:160]})"
        status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=all"], capture_output=True)
    except OSError:
        return "no git commit (git not found)"
    return head.stdout.strip() + (" + local changes" if status.stdout.strip() else "")


def note_changes(app_dir: Path) -> str:
    """:func:`checkout`, with a note on standard error where the checkout has local changes or git cannot tell."""
    state = checkout(app_dir)
    if state.endswith("local changes"):
        print(
            f"note: {app_dir} differs from commit {state.split()[0]} (git status): a clean checkout of that commit "
            "may have another digest",
            file=sys.stderr,
        )
    elif state.startswith("no git commit"):
        print(f"note: {app_dir}: {state}; whether it is a clean checkout is not known", file=sys.stderr)
    return state
