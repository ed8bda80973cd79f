"""A node's context (client.context): how much a site logs."""

from __future__ import annotations

import pytest


def test_sites_log_at_info_in_deployment_and_stay_quiet_in_simulation():
    import logging

    from client.context import configure_logging
    from mstkd.errors import InputError
    from mstkd.runconfig import NodeConfig

    logger = logging.getLogger("mstkd")
    level = logger.level
    try:
        configure_logging(NodeConfig.parse({"data-path": "/data/site", "site-name": "h1"}))
        assert logger.level == logging.INFO
        configure_logging(NodeConfig.parse({"partition-id": 0, "num-partitions": 3}))
        assert logger.level == logging.WARNING
        configure_logging(NodeConfig.parse({"partition-id": 0, "log-level": "info"}))
        assert logger.level == logging.INFO
        assert sum(getattr(h, "mstkd_site", False) for h in logger.handlers) == 1  # one handler, however often
        with pytest.raises(InputError, match="log-level"):
            NodeConfig.parse({"log-level": "loud"})
    finally:
        logger.setLevel(level)
        for h in [h for h in logger.handlers if getattr(h, "mstkd_site", False)]:
            logger.removeHandler(h)


def _metadata(created, ttl):
    from types import SimpleNamespace

    return SimpleNamespace(created_at=created, ttl=ttl)


def test_a_nodes_work_ends_when_its_message_expires_or_at_the_sites_cap():
    from client.context import CAP, EXPIRY, work_deadline

    now = 5_000.0  # the node's clock, on which Flower reckons a reply's lifetime too
    assert work_deadline(_metadata(4_000.0, 1_500.0), now=now) == (5_500.0, EXPIRY)
    assert work_deadline(_metadata(4_000.0, 1_500.0), cap=30, now=now) == (now + 30, CAP)
    assert work_deadline(_metadata(4_000.0, 1_500.0), cap=3_000, now=now) == (5_500.0, EXPIRY)
    assert work_deadline(_metadata(4_000.0, 500.0), now=now) == (4_500.0, EXPIRY)  # expired already: no work at all
    # times that do not read as finite numbers leave only the node's own cap
    assert work_deadline(_metadata(float("nan"), 100.0), now=now)[0] is None
    assert work_deadline(_metadata("yesterday", 100.0), cap=60, now=now) == (now + 60, CAP)
    assert work_deadline(_metadata(4_000.0, float("inf")), now=now)[0] is None
