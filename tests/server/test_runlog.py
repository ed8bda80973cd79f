"""The run log (server.runlog): metrics.csv and the per-round progress line."""

from __future__ import annotations


def test_metrics_csv_has_one_scalar_per_column_and_every_round_gets_a_progress_line(tmp_path):
    import pandas as pd

    from server.runlog import RunLog

    runlog = RunLog(tmp_path)
    runlog.finish(0)
    rec = runlog.record(1)
    rec.update(bytes_sent=49e6, bytes_received=25e6, train={"train-loss": 2.41}, val={"val-mean-dice": 0.52})
    runlog.site(1, 11, "site-1").update({"train-loss": 2.3, "val-mean-dice": 0.5, "device": "cpu"})
    runlog.site(1, 12, "site-2").update({"train-loss": 2.5})
    rec["failures"].append({"stage": "train", "node": 7, "reason": "boom"})
    rec["collapse"] = [{"where": "global evaluation", "what": "WT everywhere"}]
    runlog.finish(1)
    table = pd.read_csv(tmp_path / "metrics.csv")
    assert {"train/train-loss", "val/val-mean-dice", "site-1/train-loss", "site-2/train-loss"} <= set(table.columns)
    assert table.loc[1, "site-1/train-loss"] == 2.3 and table.loc[1, "failures"] == 1 and table.loc[1, "collapse"] == 1
    assert not table.map(lambda v: isinstance(v, str) and v.startswith(("{", "["))).any().any()  # no nested reprs
    line = runlog.progress(1, 3)
    assert line.startswith("round 1/3: 2/3 sites (failed: 7), train loss 2.410, site-val Dice 0.520")
    assert "sent 49 MB, received 25 MB" in line and "left" in line
    runlog.record(2)["skipped"] = "0 of 3 nodes replied"
    runlog.finish(2)
    assert "skipped (0 of 3 nodes replied)" in runlog.progress(2, 3)


def test_the_dice_plot_shows_site_validation_every_round_where_the_test_set_is_scored_once(tmp_path):
    from matplotlib.image import imread

    from server.runlog import RunLog

    runlog = RunLog(tmp_path)
    runlog.record(0)
    assert runlog.plot() is None  # nothing scored yet: no plot
    for r, dice in ((1, 0.3), (2, 0.5), (3, 0.6)):
        runlog.record(r)["val"] = {"val-mean-dice": dice}
    path = runlog.plot()
    assert path == tmp_path / "dice.png" and imread(path).shape[0] > 100  # a curve with no global evaluation yet
    runlog.records[3]["global"] = {"mean_dice": 0.55, **{f"{x}_dice": 0.5 for x in ("ET", "TC", "WT")}}
    assert runlog.plot() == path and imread(path).shape[0] > 100


def test_a_node_cannot_name_itself_into_the_servers_own_columns(tmp_path):
    """A node chooses its name: one called ``global`` or ``privacy`` that reports ``mean_dice`` or ``epsilon``
    must not replace the held-out Dice or the privacy spent in metrics.csv and the trackers."""
    from server.runlog import ROUND_KEYS, RunLog

    runlog = RunLog(tmp_path)
    rec = runlog.record(1)
    rec.update(train={"train-loss": 2.0}, val={"val-mean-dice": 0.5}, privacy={"epsilon": 3.0})
    rec["global"] = {"mean_dice": 0.4}
    runlog.site(1, 11, "global").update({"mean_dice": 0.99})
    runlog.site(1, 12, "privacy").update({"epsilon": 0.0})
    runlog.site(1, 13, "global/mean_dice").update({"train-loss": 1.0})
    runlog.site(1, 15, "global@11").update({"mean_dice": 0.0})  # only the server adds @<node>
    runlog.site(1, 16, "=cmd").update({"train-loss": 1.0})
    runlog.site(1, 14, "x" * 500).update({"train-loss": 1.0, "device": '=HYPERLINK("http://evil.example")'})
    row = runlog.row(1)
    assert row["x" * 64 + "/device"] == '\'=HYPERLINK("http://evil.example")'  # text, not a formula
    assert row["global/mean_dice"] == 0.4 and row["privacy/epsilon"] == 3.0
    assert row["global@11/mean_dice"] == 0.99 and row["privacy@12/epsilon"] == 0.0
    assert row["global_11/mean_dice"] == 0.0 and row["'=cmd/train-loss"] == 1.0
    assert row["global_mean_dice/train-loss"] == 1.0 and row["x" * 64 + "/train-loss"] == 1.0
    assert {"round", "global", "privacy", "train", "val"} <= ROUND_KEYS
