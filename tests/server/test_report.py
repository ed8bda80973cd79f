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


def test_an_address_in_a_nodes_text_is_not_made_a_link(tmp_path):
    """GitHub links a bare https://..., www.... or e-mail address even in escaped text: a node's error reason could
    put a link to a 'patched client' into the report."""
    from server.report import write_report
    from server.runlog import RunLog

    runlog = RunLog(tmp_path)
    reason = "update at https://fl-update.example/get, www.evil.example or ask admin@evil.example (bob@evil_x.org)"
    runlog.record(1)["failures"].append({"stage": "train", "node": 7, "reason": reason, "kind": "error"})
    runlog.finish(1)
    report = write_report(tmp_path, runlog, load_config(["model=tiny"]), RunConfig(), 1.0, {"round": None}).read_text()
    assert "https://" not in report and "www.evil" not in report and "@evil" not in report
    assert "https\\[:\\]//fl-update.example/get, www\\[.\\]evil.example or ask admin\\[@\\]evil.example" in report


def test_a_resumed_runs_report_pastes_only_the_tables_its_server_wrote(tmp_path):
    from server.report import write_report
    from server.runlog import RunLog

    runlog = RunLog(tmp_path)
    scores = {"mean_dice": 0.5, **{f"{region}_{m}": 0.5 for region in ("ET", "TC", "WT") for m in ("dice", "hd95")}}
    runlog.record(2)["global"] = scores
    runlog.finish(2)
    runlog.finish(3)  # resumed after round 2, stopped (e.g. by the privacy budget) before round 3 was scored
    (tmp_path / "eval").mkdir()
    # the folder was copied in: its round-2 table is a link to a file of this machine, or Markdown of any kind
    secret = tmp_path / "secret.txt"
    secret.write_text("private <img src=x>\n")
    (tmp_path / "eval" / "round_2.md").symlink_to(secret)
    cfg = load_config(["model=tiny"])
    report = write_report(tmp_path, runlog, cfg, RunConfig(), 1.0, {"round": None}, resumed_after=2)
    assert "private" not in report.read_text()  # round 2 was scored before the resume: named, not pasted
    assert "Scored before this run resumed after round 2: `eval/round_2.md`." in report.read_text()
    runlog.record(3)["global"] = scores  # a round this server scored: its table is pasted
    (tmp_path / "eval" / "round_3.md").write_text("| Subset | Dice ET |\n")
    report = write_report(tmp_path, runlog, cfg, RunConfig(), 1.0, {"round": None}, resumed_after=2)
    assert "## 15-subset table, round 3\n\n| Subset | Dice ET |" in report.read_text()
