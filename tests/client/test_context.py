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
