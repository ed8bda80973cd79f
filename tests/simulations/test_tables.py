"""The paper-layout table of REPORT.md: a block per region, then the mean of the three regions."""

from __future__ import annotations

from simulations.tables import ROW_NAMES, paper_table


def _run(et: float, tc: float, wt: float, t1_wt: float) -> dict:
    table = [{"ET_dice": et, "TC_dice": tc, "WT_dice": wt} for _ in ROW_NAMES]
    t1 = ROW_NAMES.index("T1")
    table[t1] = {**table[t1], "WT_dice": t1_wt}
    return {"table": table}


def test_the_mean_block_averages_the_regions_per_subset_and_over_seeds():
    results = {"mstkd": [_run(0.6, 0.7, 0.8, 0.1), _run(0.6, 0.7, 0.8, 0.3)], "student": [_run(0.3, 0.3, 0.3, 0.3)]}
    lines = paper_table(results, "dice", 100.0, 1).splitlines()
    regions = [line.split("|")[1].strip() for line in lines[2:]]
    assert regions == ["WT", "", "TC", "", "ET", "", "Mean", ""]  # the paper's order, then the mean
    mean_full, mean_student = (line.split("|")[3:-1] for line in lines[-2:])
    t1 = ROW_NAMES.index("T1")
    assert float(mean_full[ROW_NAMES.index("FLAIR")]) == 70.0  # (60 + 70 + 80) / 3
    assert float(mean_full[t1]) == 50.0  # WT under T1 is 20 on average over the two seeds: (60 + 70 + 20) / 3
    assert float(mean_student[t1]) == 30.0
    assert len(mean_full) == len(ROW_NAMES)  # 15 subsets and the average
