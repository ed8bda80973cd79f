"""A node's own cases: a phantom federation or a partitioned dataset in a simulation (``partition-id``), or the
node's own folder in deployment (``data-path``); the modalities each site has; the voxel size it reports when the
federation plans its target geometry, and the target a message names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mstkd.data.dataset import (
    Federation,
    case_spacings,
    prepare_federation,
    resolve_partitions,
    site_split,
    split_of,
)
from mstkd.data.geometry import DEFAULT_ORIENTATION, TargetGeometry, plan_spacing
from mstkd.data.layouts import detect_case, find_case_folders
from mstkd.data.partitions import Partitions
from mstkd.errors import InputError, RefusedMessage
from mstkd.modalities import FULL, MODALITIES, Subset, subsets_within
from mstkd.runconfig import NodeConfig, RunConfig, project_config

log = logging.getLogger("mstkd.data")


def data_source(run: RunConfig, num_sites: int) -> tuple[Path, Path | None]:
    """``(data folder, partition CSV)`` for a simulation: the run's ``data-path`` or a phantom federation."""
    if run.data_path:
        csv = run.partitioning or None
        return Path(run.data_path).expanduser(), Path(csv).expanduser() if csv else None
    from mstkd.phantoms import ensure_phantoms  # the generator (nilearn's template) only where phantoms are used

    folder = ensure_phantoms(
        run.home / "phantoms",
        cases=run.phantom_cases,
        sites=num_sites,
        shape=run.phantom_grid(),
        seed=run.phantom_seed,
    )
    return folder, folder / "partitioning.csv"


@dataclass
class SiteData:
    """A node's view of the data: its site key and name, the modalities it has, and its cases."""

    federation: Federation
    site: str
    name: str
    available: Subset

    @property
    def train(self):
        return self.federation.site_cases(self.site, "train")

    @property
    def val(self):
        return self.federation.site_cases(self.site, "val")

    @property
    def subsets(self) -> tuple[Subset, ...]:
        """The modality subsets this site's student can be trained on."""
        return subsets_within(self.available)


def parse_dropped(spec: str, sites: Sequence[str] | None = None) -> dict[str, Subset]:
    """``"2:t1ce; 3:t1ce,t2"`` -> site id -> the modalities that site keeps (the simulated missing modalities).
    With ``sites``, a site id that is not one of them is refused (a misspelt id would leave that site whole)."""
    kept = {}
    for item in filter(None, (part.strip() for part in spec.replace(";", " ").split())):
        site, sep, names = item.partition(":")
        if not sep:
            raise InputError(f"drop-modalities: {item!r} is not of the form SITE:MODALITY[,MODALITY]")
        dropped = Subset.parse(names)
        keep = [m for m in MODALITIES if m not in dropped.modalities]
        if not keep:
            raise InputError(f"drop-modalities: site {site} would keep no modality")
        kept[site.strip()] = Subset.of(keep)
    unknown = sorted(set(kept) - set(sites)) if sites is not None else []
    if unknown:
        raise InputError(f"drop-modalities names site {unknown[0]!r}, but the sites are {', '.join(sites)}")
    return kept


def _modalities_on_disk(folder: Path) -> Subset:
    """The modalities the site has: those on disk in at least half of its cases. A case that lacks one of
    them is a broken case (left out with a warning); a modality most cases lack is one the site lacks."""
    counts = dict.fromkeys(MODALITIES, 0)
    cases = find_case_folders(folder).values()
    for case in cases:
        try:
            available = detect_case(case).available
        except InputError:
            continue  # unreadable layout: the case is reported when it is loaded
        for m in available:
            counts[m] += 1
    kept = [m for m in MODALITIES if counts[m] and 2 * counts[m] >= len(cases)]
    if not kept:
        raise InputError(f"{folder}: no modality is present in at least half of the cases")
    return Subset.of(kept)


def _with_modalities(cfg: DictConfig, available: Subset) -> DictConfig:
    return OmegaConf.merge(cfg, {"data": {"modalities": list(available.modalities)}})


def _simulated_site(run: RunConfig, node: NodeConfig) -> tuple[Path, Path | None, str, dict[str, Path], Partitions]:
    """A simulated node's dataset folder, partition CSV and site name, with the dataset's case folders and
    partitions (as :func:`~mstkd.data.dataset.resolve_partitions` read them)."""
    if node.partition_id is None or node.num_partitions is None:
        raise InputError("node config needs data-path (deployment) or partition-id and num-partitions (simulation)")
    index, count = node.partition_id, node.num_partitions
    folder, csv = data_source(run, count)
    folders, partitions = resolve_partitions(folder, csv)
    sites = list(partitions.sites)
    if len(sites) != count:
        raise InputError(
            f"{csv or folder}: {len(sites)} sites but {count} simulated nodes; "
            f'use --federation-config "num-supernodes={len(sites)}"'
        )
    parse_dropped(run.drop_modalities, sites)
    return folder, csv, sites[index], folders, partitions


def site_spacing(run: RunConfig, node: NodeConfig, orientation: str) -> tuple[list[float], int]:
    """This node's median voxel size in ``orientation`` and how many cases it is the median of, from the image
    headers alone: what a site tells the federation when it plans its target geometry (no voxel is read).

    Raises:
        InputError: no readable case.
    """
    if node.data_path:  # a deployed site's cases are all train or val (its test cases live with the server)
        folders = list(find_case_folders(Path(node.data_path).expanduser()).values())
    else:
        _, _, site, all_folders, partitions = _simulated_site(run, node)
        split = split_of(partitions, project_config(run).data)
        folders = [all_folders[c] for c in site_split(split, site)]
    spacings = case_spacings(folders, orientation)
    return list(plan_spacing(spacings)), len(spacings)


def with_target(cfg: DictConfig, config: Mapping[str, Any]) -> DictConfig:
    """``cfg`` with the target geometry a message's ``config`` names (``target-spacing``: three numbers in one
    string, ``orientation``), which the federation agreed on before its first round. Where ``cfg`` (the run config)
    sets ``data.target_spacing``, the message must name that geometry: the run config is what a site approves
    (``deploy/plans.py``), the message what the server sends.

    Raises:
        RefusedMessage: a target that is not three voxel sizes in range, or not an orientation, or not the run
            config's.
    """
    if "target-spacing" not in config:
        if cfg.data.target_spacing is None:
            log.warning("the message names no target geometry (a server of an older version?): this site plans its own")
        return cfg
    try:
        target = TargetGeometry(
            tuple(str(config["target-spacing"]).split()),  # type: ignore[arg-type]
            str(config.get("orientation", DEFAULT_ORIENTATION)),
        )
    except InputError as exc:
        raise RefusedMessage(f"the message's target geometry is not valid ({exc})") from None
    pinned = TargetGeometry.from_config(cfg.data)
    if pinned is not None and pinned != target:
        raise RefusedMessage(f"the message's target geometry {target.describe()} is not this run's {pinned.describe()}")
    return OmegaConf.merge(cfg, {"data": target.to_config()})


def site_data(run: RunConfig, node: NodeConfig, cfg: DictConfig) -> SiteData:
    """The cases of this node, and the modalities it has.

    Deployment: the node config's ``data-path`` is the site's own folder; all its cases are the site's
    (split into train/val; the global test set lives with the server). The site's modalities
    are its ``modalities`` (e.g. ``"flair,t1,t2"``) or, when not given, those present in
    every case. Simulation: ``partition-id`` picks the i-th site (in partition order)
    of the run's dataset, which must have exactly ``num-partitions`` sites; the run
    config ``drop-modalities`` (``"2:t1ce"``) makes chosen sites lack modalities.

    Rule for a site that lacks modalities: its cases are read without them (zero channels, even
    where a file exists), its student draws only subsets of what the site has, and its teacher
    sees everything the site has; distillation runs on every case, between that teacher and
    that student.
    """
    if node.data_path:
        folder = Path(node.data_path).expanduser()
        available = Subset.parse(node.modalities) if node.modalities else _modalities_on_disk(folder)
        site_cfg = _with_modalities(cfg, available)
        no_test = OmegaConf.merge(site_cfg.data, {"split": {"test_fraction": 0.0}})
        fed = prepare_federation(
            folder, no_test, cache_dir=node.cache_dir or None, test=False, progress=False, skip_bad=True
        )
        if len(fed.sites) != 1:
            raise InputError(
                f"{folder}: a node's data folder holds one site, but its partition CSV names {len(fed.sites)}"
            )
        return SiteData(fed, fed.sites[0], node.site_name or folder.name, available)
    folder, csv, site, _, _ = _simulated_site(run, node)
    available = parse_dropped(run.drop_modalities).get(site, FULL)
    site_cfg = _with_modalities(cfg, available)
    fed = prepare_federation(
        folder, site_cfg.data, partitioning=csv, sites=[site], test=False, progress=False, skip_bad=True
    )
    return SiteData(fed, site, f"site-{site}", available)


def held_out_cases(run: RunConfig, cfg: DictConfig, num_sites: int) -> list:
    """The held-out cases a run's global model is scored on: every case of ``test-data-path``, or the test split
    of the run's dataset (``num_sites``: how many sites a phantom federation has); the first ``eval-cases`` of them
    when that is above 0."""
    if run.test_data_path:
        fed = prepare_federation(Path(run.test_data_path).expanduser(), cfg.data, progress=False, skip_bad=True)
        cases = [e for s in fed.sites for e in fed.site_cases(s, "train") + fed.site_cases(s, "val")] + fed.test_cases()
    else:
        folder, csv = data_source(run, num_sites)
        fed = prepare_federation(folder, cfg.data, partitioning=csv, sites=[], test=True, progress=False, skip_bad=True)
        cases = fed.test_cases()
    return cases[: run.eval_cases] if run.eval_cases > 0 else cases
