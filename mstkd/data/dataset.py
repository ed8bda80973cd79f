"""From a data folder to cached, split, ready-to-load sites.

:func:`prepare_federation` is the ``preprocess`` stage: find the case folders, read the
partition CSV (or put every case in one site), check the CSV against the disk, split
deterministically, fill the cache with a progress bar and write the split as CSV beside
the cache. The returned :class:`Federation` hands out cache entries per site and split,
and :func:`make_loader` turns them into a MONAI ``DataLoader``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from monai.data import DataLoader, Dataset
from omegaconf import DictConfig
from tqdm.auto import tqdm

from mstkd.data.cache import SPLIT_CSV, CachedCase, CaseCache, make_cache_folder
from mstkd.data.geometry import (
    DEFAULT_ORIENTATION,
    TargetGeometry,
    check_orientation,
    format_spacing,
    header_affine,
    is_anisotropic,
    orientation_of,
    oriented_spacing,
    plan_spacing,
)
from mstkd.data.layouts import detect_case, find_case_folders
from mstkd.data.partitions import (
    Partitions,
    Split,
    check_cases_exist,
    make_split,
    read_partitions,
    single_site,
    write_split_csv,
)
from mstkd.data.transforms import eval_transforms, load_cached, train_transforms
from mstkd.errors import InputError

log = logging.getLogger("mstkd.data")
_WARNED: set[tuple[str, str]] = set()

DEFAULT_PARTITIONING = "partitioning.csv"
DEFAULT_CACHE = ".mstkd-cache"


@dataclass
class Federation:
    """Cached cases of a dataset, split into sites (train/val) and a global test set."""

    data_dir: Path
    cache_dir: Path
    partitions: Partitions
    split: Split
    entries: dict[str, CachedCase]
    split_csv: Path
    target: TargetGeometry
    skipped: dict[str, str] = field(default_factory=dict)  # case -> why it was left out (skip_bad)

    @property
    def sites(self) -> list[str]:
        return self.split.sites

    def site_cases(self, site: str, split: str = "train") -> list[CachedCase]:
        ids = {"train": self.split.train, "val": self.split.val}[split][site]
        return [self.entries[c] for c in ids]

    def test_cases(self) -> list[CachedCase]:
        return [self.entries[c] for c in self.split.test]

    def summary(self) -> str:
        """A table of sites with their train/val counts, and the test-set size."""
        lines = ["| site | train | val |", "|---|---:|---:|"]
        for site in self.sites:
            lines.append(f"| {site} | {len(self.split.train[site])} | {len(self.split.val[site])} |")
        lines.append(f"| **held-out test** | {len(self.split.test)} | |")
        return "\n".join(lines)


def resolve_partitions(data_dir: Path, partitioning: str | Path | None) -> tuple[dict[str, Path], Partitions]:
    """Case folders and their partitions: ``partitioning``, else ``data_dir/partitioning.csv`` when it exists,
    else one site holding every case; a CSV naming cases not on disk is refused."""
    folders = find_case_folders(data_dir)
    if partitioning is None and (data_dir / DEFAULT_PARTITIONING).is_file():
        partitioning = data_dir / DEFAULT_PARTITIONING
    partitions = read_partitions(partitioning) if partitioning else single_site(folders)
    check_cases_exist(partitions, folders)
    return folders, partitions


def split_of(partitions: Partitions, cfg: DictConfig) -> Split:
    """The deterministic train/val/test split of ``partitions`` under the ``data`` section's ``split`` settings."""
    s = cfg.split
    return make_split(
        partitions,
        seed=int(s.seed),
        val_fraction=float(s.val_fraction),
        test_fraction=float(s.test_fraction),
        min_site_cases_for_test=int(s.min_site_cases_for_test),
    )


def site_split(split: Split, site: str) -> list[str]:
    """A site's training and validation cases (what it trains and selects on; never the held-out test cases)."""
    return split.train[site] + split.val[site]


def case_spacings(folders: Sequence[Path], orientation: str) -> list[tuple[float, float, float]]:
    """The voxel size of each case folder in ``orientation``, read from one image header each (no voxels are
    read); a folder that does not read as a case is left out here (it is reported when it is cached)."""
    out = []
    for folder in folders:
        try:
            files = detect_case(folder)
            out.append(oriented_spacing(header_affine(next(iter(files.images.values()))), orientation))
        except (InputError, StopIteration):
            continue
    return out


def plan_target(cfg: DictConfig, folders: Sequence[Path]) -> TargetGeometry:
    """``data.target_spacing`` when set, else nnU-Net's plan: the per-axis median voxel size of ``folders``
    (the training cases), both in ``data.orientation``.

    Raises:
        InputError: no spacing set and no readable case to plan from.
    """
    given = TargetGeometry.from_config(cfg)
    if given is not None:
        return given
    orientation = check_orientation(cfg.get("orientation") or DEFAULT_ORIENTATION)  # an older config has none
    return TargetGeometry(plan_spacing(case_spacings(folders, orientation)), orientation)


def prepare_federation(
    data_dir: str | Path,
    cfg: DictConfig,
    *,
    partitioning: str | Path | None = None,
    cache_dir: str | Path | None = None,
    sites: Sequence[str] | None = None,
    test: bool = True,
    progress: bool = True,
    skip_bad: bool = False,
) -> Federation:
    """Validate, normalise, cache and split a dataset (the ``preprocess`` stage).

    Args:
        data_dir: folder of case folders.
        cfg: the ``data`` section of the config.
        partitioning: partition CSV; default ``data_dir/partitioning.csv`` when it exists,
            otherwise one site holding every case.
        cache_dir: where entries go; default ``data_dir/.mstkd-cache``.
        sites: cache the train/val cases of these sites only (default: every site), and plan the target
            geometry (when ``cfg.target_spacing`` is not set) from theirs; a federated node passes its own, so
            it never reads another site's files.
        test: cache the held-out test cases too.
        progress: show a progress bar while caching.
        skip_bad: leave out a case that cannot be read or fails validation (truncated or missing
            files, shape or affine mismatch, NaN voxels, labels outside the convention), with one
            warning line each, instead of raising. The files are never touched.

    Raises:
        InputError: on any bad CSV, and on a bad case unless ``skip_bad`` (see :mod:`mstkd.data.cases`,
            :mod:`mstkd.data.partitions`).
    """
    data_dir = Path(data_dir)
    folders, partitions = resolve_partitions(data_dir, partitioning)
    split = split_of(partitions, cfg)
    # planned from the training cases of the sites asked for (the test cases when none is)
    planned = [folders[c] for site in split.sites if sites is None or site in sites for c in site_split(split, site)]
    target = plan_target(cfg, planned or [folders[c] for c in split.test])
    root = Path(cache_dir or data_dir / DEFAULT_CACHE)
    real = root.resolve()
    cases = [Path(folder).resolve() for folder in folders.values()]
    if real == data_dir.resolve() or any(real == case or real in case.parents for case in cases):
        raise InputError(f"{root}: the cache folder may not be the data folder, a case folder or a folder above one")
    make_cache_folder(root)
    cache = CaseCache(
        root,
        normalization=cfg.normalization,
        dtype=cfg.cache_dtype,
        modalities=list(cfg.modalities),
        target=target,
    )
    unknown = [s for s in sites or () if s not in split.train]
    if unknown:
        raise InputError(f"{partitioning or data_dir}: no site {unknown[0]!r} (sites: {', '.join(split.sites)})")
    wanted = [c for s in (split.sites if sites is None else sites) for c in split.train[s] + split.val[s]]
    wanted += split.test if test else []
    entries, skipped = {}, {}
    for case_id in tqdm(wanted, desc="preprocess", unit="case", disable=not progress, leave=False):
        try:
            entries[case_id] = cache.get(detect_case(folders[case_id]))
        except InputError as exc:
            if not skip_bad:
                raise
            skipped[case_id] = str(exc)
            if (str(folders[case_id]), str(exc)) not in _WARNED:  # once per process, not once per round
                _WARNED.add((str(folders[case_id]), str(exc)))
                log.warning("skipping case %s: %s", case_id, exc)
    if skipped:
        split = Split(
            {site: [c for c in cases if c not in skipped] for site, cases in split.train.items()},
            {site: [c for c in cases if c not in skipped] for site, cases in split.val.items()},
            [c for c in split.test if c not in skipped],
            {c: site for c, site in split.test_origin.items() if c not in skipped},
        )
    split_csv = write_split_csv(split, cache.root / SPLIT_CSV)
    by_site = {site: split.train[site] + split.val[site] for site in split.sites}
    for case_id in split.test:
        by_site.setdefault(split.test_origin.get(case_id, "test"), []).append(case_id)
    for site, cases in by_site.items():
        for warning in geometry_warnings(site, [entries[c] for c in cases if c in entries], target):
            if (str(data_dir), warning) not in _WARNED:  # once per site and process
                _WARNED.add((str(data_dir), warning))
                log.warning(warning)
    return Federation(data_dir, cache.root, partitions, split, entries, split_csv, target, skipped)


def geometry_warnings(site: str, entries: Sequence[CachedCase], target: TargetGeometry) -> list[str]:
    """At most two lines for ``site``: how many of its cases were resampled to ``target`` (and from what), and
    how many have thick slices (a coarsest axis over 3x the finest), whose missing detail no resampling restores."""
    warnings = []
    resampled = [e for e in entries if e.meta.get("resampled")]
    if resampled:
        source = resampled[0].meta["source"]
        warnings.append(
            f"site {site}: {len(resampled)} of {len(entries)} cases reoriented or resampled to the target "
            f"{target.describe()} (e.g. {resampled[0].case_id} from {format_spacing(source['spacing'])} mm "
            f"{orientation_of(source['affine'])})"
        )
    thick = [e for e in entries if is_anisotropic(e.meta["source"]["spacing"])]
    if thick:
        source = thick[0].meta["source"]["spacing"]
        warnings.append(
            f"site {site}: {len(thick)} of {len(entries)} cases have thick slices (e.g. {thick[0].case_id} at "
            f"{format_spacing(source)} mm): the model cannot recover the detail between them"
        )
    return warnings


def make_loader(
    entries: Sequence[CachedCase],
    cfg: DictConfig,
    *,
    train: bool,
    patch: Sequence[int] | None = None,
    batch_size: int = 1,
    shuffle: bool | None = None,
) -> DataLoader:
    """A MONAI ``DataLoader`` over cache entries: random ``patch`` crops when ``train``, whole volumes otherwise.

    ``cfg`` is the ``data`` section; the patch defaults to ``cfg.patch_size``.
    """
    if train:
        patch = patch or cfg.patch_size
        if not patch:
            raise ValueError("a training loader needs a patch size (data.patch_size or the model's input size)")
    transform = train_transforms(cfg, patch) if train else eval_transforms()
    dataset = Dataset(list(entries), transform=_LoadThen(transform))
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=train if shuffle is None else shuffle, num_workers=int(cfg.num_workers)
    )


class _LoadThen:
    """Load a cache entry when the sample is drawn, then apply ``transform``; keeps RAM flat for big sites."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, entry: CachedCase):
        return self.transform(load_cached(entry))
