"""Before its first round a federation agrees on one target geometry (the voxel size its model works at).

nnU-Net plans the target spacing as the median voxel size of the training cases. No party here
sees every case, so each site reports the median of its own cases and how many cases that is (from
the image headers; four numbers leave the site, and with ``site-cases`` its public key and a
signature), and the server takes the per-axis median of the sites' medians, one vote per site. The
case counts are logged but not weighed: a count is its site's word, and a weighted median lets one
site that claims ``max-examples`` cases decide alone.
With one vote each, a site among three or more cannot move the target beyond the other sites'
medians. A run config that sets ``data.target_spacing`` (``overrides``) skips the exchange. The
agreed value goes to every node with every train and evaluate message, the server's held-out
cases are cached at it, and every checkpoint stores it.

A site's reply is input from outside: exactly the four numbers, each voxel size within
:data:`~mstkd.data.geometry.MIN_SPACING` .. :data:`~mstkd.data.geometry.MAX_SPACING` mm, a case count in
1 .. ``max-examples``; with run config ``site-cases``, signed by a listed key that signed no other site's report
(:mod:`messages.signed_replies`). A reply that fails these checks, an error reply and silence are logged with the
node's id and leave the plan to the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from messages.signed_replies import ASKED, shared_keys
from mstkd.data.geometry import TargetGeometry, check_orientation, check_spacing, format_spacing, plan_spacing
from mstkd.errors import InputError
from mstkd.numbers import is_finite, is_number, is_whole
from server.loop import send_and_receive, wait_for_nodes
from server.replies import SiteCases, printable

log = logging.getLogger("mstkd.server")

REPLY_KEYS = frozenset({"num-examples", "spacing-0", "spacing-1", "spacing-2"})


def reported_spacing(content: RecordDict, max_examples: int) -> tuple[tuple[float, float, float], int]:
    """The voxel size and case count of one site's reply.

    Raises:
        ValueError: anything but exactly :data:`REPLY_KEYS` with values in range.
    """
    if "metrics" not in content.metric_records or set(content.metric_records["metrics"]) != REPLY_KEYS:
        raise ValueError("its reply is not the four numbers of a voxel-size report")
    metrics = content.metric_records["metrics"]
    cases = metrics["num-examples"]
    if not is_whole(cases) or not 1 <= cases <= max_examples:
        shown = repr(cases) if is_number(cases) else f"of type {type(cases).__name__}"
        raise ValueError(f"num-examples {shown} is not a case count in 1..{max_examples}")
    values = [metrics[f"spacing-{axis}"] for axis in range(3)]
    if not all(is_finite(v) for v in values):
        raise ValueError("its voxel size is not three finite numbers")
    try:
        return check_spacing(values, "voxel size"), cases
    except InputError as exc:
        raise ValueError(str(exc)) from None


def agree_target(
    grid: Grid,
    data_cfg,
    *,
    min_nodes: int,
    node_wait: float,
    timeout: float,
    max_examples: int,
    listing: SiteCases | None = None,
    say: Callable[[str], None] = log.info,
) -> TargetGeometry:
    """``data.target_spacing`` when the run config sets it; otherwise the median of the connected sites' median
    voxel sizes, one vote per site (see the module doc). With ``listing`` (run config ``site-cases``) a site votes
    only with a report signed by a listed key that signed no other site's.

    Raises:
        InputError: no site gave a usable report.
    """
    given = TargetGeometry.from_config(data_cfg)
    if given is not None:
        say(f"target geometry {given.describe()} (data.target_spacing)")
        return given
    orientation = check_orientation(data_cfg.orientation)
    wait_for_nodes(grid, min_nodes, node_wait)
    nodes = sorted(grid.get_node_ids())
    config = {"orientation": orientation, **({ASKED: True} if listing is not None else {})}
    content = RecordDict({"config": ConfigRecord(config)})
    sent = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=node) for node in nodes]
    reports: dict[int, tuple[tuple[float, float, float], int, bytes]] = {}
    heard: set[int] = set()
    for reply in send_and_receive(grid, sent, timeout):
        node = reply.metadata.src_node_id
        try:
            if node in heard:
                raise ValueError("a second reply from this node")
            heard.add(node)
            if reply.has_error():
                raise ValueError(f"error reply: {printable(reply.error.reason)}")
            spacing, count = reported_spacing(reply.content, max_examples)
            signer = listing.vouched(reply.content, node, "query", 0, count)[0] if listing is not None else b""
        except ValueError as exc:
            log.warning("planning the target geometry: node %s left out: %s", node, exc)
            continue
        reports[node] = spacing, count, signer
    shared = shared_keys(signer for _, _, signer in reports.values())
    for node in [n for n, (_, _, signer) in sorted(reports.items()) if signer in shared]:
        log.warning("planning the target geometry: node %s left out: its key signed another node's report", node)
        del reports[node]
    spacings, cases = [r[0] for r in reports.values()], [r[1] for r in reports.values()]
    for node in sorted(set(nodes) - heard):
        log.warning("planning the target geometry: node %s left out: no reply within %g s", node, timeout)
    if not spacings and listing is not None:  # a target set by hand would only move the refusals to round 1
        raise InputError(
            f"no site reported its voxel size signed by a key of site-cases ({len(nodes)} asked): are the nodes "
            "started with their secagg-key, and are their keys listed?"
        )
    if not spacings:
        raise InputError(
            f"no site reported its voxel size ({len(nodes)} asked); set one with "
            "overrides='data.target_spacing=[1,1,1]'"
        )
    target = TargetGeometry(plan_spacing(spacings), orientation)  # type: ignore[arg-type]
    missing = len(nodes) - len(spacings)
    left_out = f"; {missing} site{'s' * (missing > 1)} left out (see the log)" if missing else ""
    say(
        f"target geometry {target.describe()}: the median of {len(spacings)} sites' median voxel sizes "
        f"({', '.join(f'{format_spacing(s)} of {n} cases' for s, n in zip(spacings, cases, strict=True))}){left_out}"
    )
    return target
