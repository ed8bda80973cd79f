"""The run's REPORT.md (server.report): collapse warnings, and what a node says shown as text."""

from __future__ import annotations

import json

from mstkd.config import load_config
from mstkd.runconfig import RunConfig


def test_collapse_is_flagged_in_the_run_log_the_report_and_one_terminal_line(tmp_path, capsys):
    from server.evaluation import flag_collapse
    from server.report import write_report
    from server.runlog import RunLog

    runlog = RunLog(tmp_path)
    flag_collapse(runlog.record(1), 1, "global evaluation", "WT predicted in 93% of the brain with FLAIR")
    runlog.finish(1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "WARNING round 1" in err[0] and "WT predicted in 93%" in err[0]
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["collapse"] == [{"where": "global evaluation", "what": "WT predicted in 93% of the brain with FLAIR"}]
    cfg = load_config(["model=tiny"])
    report = write_report(tmp_path, runlog, cfg, RunConfig(), 1.0, {"val_mean_dice": -1.0, "round": None}).read_text()
    assert "## Collapse warnings" in report
    assert "round 1, global evaluation: WT predicted in 93% of the brain with FLAIR" in report


def test_what_a_node_says_is_shown_as_text_in_the_report(tmp_path):
    from server.report import write_report
    from server.runlog import RunLog

    runlog = RunLog(tmp_path)
    runlog.record(1)["failures"].append(
        {"stage": "train", "node": 7, "reason": "![x](http://evil.example) | <script>", "kind": "error"}
    )
    # a resumed run's records come from server_state.npz, a file that may have been edited: no field is trusted
    runlog.record(1)["failures"].append({"stage": "<img src=x>", "node": "[y](http://evil.example)", "reason": 5})
    runlog.finish(1)
    report = write_report(tmp_path, runlog, load_config(["model=tiny"]), RunConfig(), 1.0, {"round": None}).read_text()
    assert "![x](" not in report and "<script>" not in report and "\\!\\[x\\]" in report
    assert "<img src=x>" not in report and "[y](" not in report and "\\[y\\]" in report
