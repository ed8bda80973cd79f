"""Partition CSVs and the deterministic site / train / validation / test split.

A partition CSV has the FeTS header ``Partition_ID,Subject_ID`` (one partition = one
site; the real ones for FeTS 2022/2024 are ``partitioning_1.csv`` with 23 institutions and
``partitioning_2.csv`` with 33). Two optional columns fix the split explicitly:
``TrainOrVal`` (``train``/``val``, as the FeTS challenge accepts) or ``Split``
(``train``/``val``/``test``, as :func:`write_split_csv` writes it, so a saved split
reproduces exactly).

Without them, :func:`make_split` draws, per site and from a seeded generator:
``test_fraction`` of its cases into one global held-out test set (sites smaller than
``min_site_cases_for_test`` give none), then ``val_fraction`` of the rest into the site's
local validation set (at least one case when the site has two or more). No case is in two
splits, and no site trains on a test case.
"""

from __future__ import annotations

import csv
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mstkd.atomic import atomic_path
from mstkd.errors import InputError

SPLITS = ("train", "val", "test")


@dataclass
class Partitions:
    """Site -> case ids, in file order, plus any explicit split read from the CSV."""

    path: Path | None
    sites: dict[str, list[str]]
    explicit: dict[str, str] = field(default_factory=dict)  # case id -> train/val/test

    @property
    def case_ids(self) -> list[str]:
        return [c for cases in self.sites.values() for c in cases]


@dataclass
class Split:
    """The outcome of splitting: per-site train/val lists and one global test list."""

    train: dict[str, list[str]]
    val: dict[str, list[str]]
    test: list[str]
    test_origin: dict[str, str] = field(default_factory=dict)  # test case -> the site it came from

    @property
    def sites(self) -> list[str]:
        return list(self.train)

    def rows(self) -> Iterable[tuple[str, str, str]]:
        """``(site, case, split)`` for every case, sites in order."""
        for site in self.train:
            yield from ((site, c, "train") for c in self.train[site])
            yield from ((site, c, "val") for c in self.val[site])
            yield from ((site, c, "test") for c in self.test if self.test_origin.get(c) == site)


def _sort_key(site: str) -> tuple[int, int | str]:
    return (0, int(site)) if re.fullmatch(r"-?[0-9]+", site) else (1, site)  # "²" and "--1" are names, not numbers


def read_partitions(path: str | Path) -> Partitions:
    """Read a partition CSV (CRLF or LF, optional BOM, ids kept as strings).

    Raises:
        InputError: missing file or columns, an empty file, a repeated subject, an
            unknown value in ``TrainOrVal``/``Split``, or a file that is not UTF-8 CSV.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: partition CSV not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            if "Partition_ID" not in columns or "Subject_ID" not in columns:
                raise InputError(
                    f"{path}: expected the header Partition_ID,Subject_ID, got {','.join(columns) or 'nothing'}"
                )
            sites: dict[str, list[str]] = {}
            explicit: dict[str, str] = {}
            seen: dict[str, int] = {}
            for line, row in enumerate(reader, start=2):
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                site, case = row["Partition_ID"], row["Subject_ID"]
                if not case:
                    continue
                if case in seen:
                    raise InputError(f"{path}: subject {case} appears twice (lines {seen[case]} and {line})")
                seen[case] = line
                sites.setdefault(site, []).append(case)
                tag = (row.get("Split") or row.get("TrainOrVal") or "").lower()
                if tag:
                    tag = {"validation": "val", "training": "train"}.get(tag, tag)
                    if tag not in SPLITS:
                        raise InputError(f"{path}: line {line}: split {tag!r} is not one of train, val, test")
                    explicit[case] = tag
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text (save it as UTF-8)") from None
    except csv.Error as exc:
        raise InputError(f"{path}: not a readable CSV ({exc})") from None
    if not sites:
        raise InputError(f"{path}: no subjects listed")
    if explicit and len(explicit) != len(seen):
        raise InputError(f"{path}: the split column is filled for some subjects only")
    return Partitions(path, {s: sites[s] for s in sorted(sites, key=_sort_key)}, explicit)


def single_site(case_ids: Iterable[str]) -> Partitions:
    """All cases in one site ``1`` (for a dataset that comes without a partition CSV)."""
    return Partitions(None, {"1": sorted(case_ids)})


def check_cases_exist(partitions: Partitions, available: Iterable[str]) -> None:
    """Refuse a CSV that names cases not on disk."""
    on_disk = set(available)
    missing = [c for c in partitions.case_ids if c not in on_disk]
    if missing:
        where = partitions.path or "partitions"
        example = ", ".join(missing[:3])
        raise InputError(f"{where}: {len(missing)} subject(s) not found in the data folder (e.g. {example})")


def _site_rng(seed: int, site: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(site.encode())])


def validation_count(cases: int, val_fraction: float) -> int:
    """How many of a site's ``cases`` (its test cases set aside) :func:`make_split` keeps for validation: at least
    one of two or more, while ``val_fraction`` is above 0."""
    return max(1, int(round(cases * val_fraction))) if cases >= 2 and val_fraction > 0 else 0


def make_split(
    partitions: Partitions,
    *,
    seed: int = 42,
    val_fraction: float = 0.2,
    test_fraction: float = 0.1,
    min_site_cases_for_test: int = 5,
) -> Split:
    """Deterministic per-site train/val split plus a global held-out test set (see module doc)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1):
        raise InputError("split fractions must lie in [0, 1)")
    train: dict[str, list[str]] = {}
    val: dict[str, list[str]] = {}
    test: list[str] = []
    origin: dict[str, str] = {}
    for site, cases in partitions.sites.items():
        if partitions.explicit:
            chosen = {s: [c for c in cases if partitions.explicit[c] == s] for s in SPLITS}
        else:
            order = sorted(cases)
            _site_rng(seed, site).shuffle(order)
            n_test = int(round(len(order) * test_fraction)) if len(order) >= min_site_cases_for_test else 0
            rest = order[n_test:]
            n_val = validation_count(len(rest), val_fraction)
            chosen = {"test": order[:n_test], "val": sorted(rest[:n_val]), "train": sorted(rest[n_val:])}
        train[site], val[site] = chosen["train"], chosen["val"]
        test.extend(sorted(chosen["test"]))
        origin.update({c: site for c in chosen["test"]})
    return Split(train, val, test, origin)


def write_split_csv(split: Split, path: str | Path) -> Path:
    """Write ``Partition_ID,Subject_ID,Split`` (readable again by :func:`read_partitions`), atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Partition_ID", "Subject_ID", "Split"])
        writer.writerows(split.rows())
    return Path(path)
