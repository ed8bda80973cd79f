"""A benchmark's published folder (``simulations/results/<scenario>/``): the report, its tables and plots, and the
small files of every finished run (``runs/<arm>/seed-<s>/``), from which the report can be rebuilt and with which a
benchmark continued elsewhere skips the runs already made."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from mstkd.errors import InputError, read_json_object
from mstkd.numbers import is_finite
from simulations.scenario import Arm, Scenario, ScenarioData

DONE = "done.json"
REPORT_FILES = (
    "REPORT.md",
    "bench.json",
    "summary.csv",
    "summary.json",
    "comparisons.csv",
    "sites.csv",
    "curves.csv",
    "curves.png",
    "grad_scales.json",
)


RUN_FILES = {"table": re.compile(r"eval/(round_[0-9]+|final)\.json"), "log": re.compile(r"metrics\.jsonl|log\.jsonl")}
"""The files a run's ``done.json`` may name, as the benchmark writes them (a published folder comes from elsewhere:
a name like ``../../x`` would read or write outside the run)."""


def no_link(root: Path, name: str) -> Path:
    """``root / name``, refused (:class:`InputError`) where it or a folder on the way from ``root`` is a link: a
    benchmark's or a published folder holds plain files and folders only, so nothing is read, written or removed
    through a link someone else committed."""
    path = root
    for part in Path(name).parts:
        path = path / part
        if path.is_symlink():
            raise InputError(f"{path}: a link; a benchmark's and a published folder hold plain files only")
    return path


def plain_file(root: Path, name: str) -> Path:
    """``root / name``, refused unless it is a file and neither it nor a folder on the way from ``root`` is a link
    (a link in a published folder would copy a file of this machine into it).

    Raises:
        InputError: a link on the way, or no such file.
    """
    path = no_link(root, name)
    if not path.is_file():
        raise InputError(f"{path}: not found")
    return path


def _copy(source: Path, root: Path, name: str) -> None:
    """Copy ``source`` to ``root / name``, refused where a link lies on the way: a published folder from elsewhere
    may hold one (``REPORT.md`` linked to a file of this machine), and copying onto it would write through it."""
    dest = no_link(root, name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, dest)


MAX_RECORD_BYTES = 16 << 20
"""The largest ``done.json`` or ``bench.json`` read (the benchmark writes a few kB)."""


def _json_object(path: Path) -> dict[str, Any]:
    return read_json_object(path, MAX_RECORD_BYTES)


def read_done(root: Path, run: str) -> dict[str, Any]:
    """The ``done.json`` of the finished run ``root / run`` (``arm/seed-s``, or ``runs/arm/seed-s`` in a published
    folder), checked: no link from ``root`` on (:func:`no_link`), a JSON object that names its table and log as the
    benchmark writes them (:data:`RUN_FILES`, each a plain file of the run), and whose wall time, if given, is a
    number of seconds.

    Raises:
        InputError: anything else, in one line.
    """
    path = plain_file(root, f"{run}/{DONE}")
    done = _json_object(path)
    for key, pattern in RUN_FILES.items():
        name = done.get(key)
        if not isinstance(name, str) or not pattern.fullmatch(name):
            raise InputError(f"{path}: its {key} is not a file the benchmark writes ({str(name)[:60]!r})")
        plain_file(root, f"{run}/{name}")
    if "seconds" in done and (not is_finite(done["seconds"]) or done["seconds"] < 0):
        raise InputError(f"{path}: its seconds is not a number of seconds")
    return done


def run_id(arm: str, seed: int) -> str:
    """A run's name and its folder relative to a benchmark: ``<arm>/seed-<s>``."""
    return f"{arm}/seed-{seed}"


def publish(bench: Path, target: Path, arms: list[Arm], seeds: list[int]) -> Path:
    """Copy the report and what it is built from (tables, plots, summaries, the runs of ``arms`` x ``seeds``;
    no checkpoints) to ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        if (bench / name).is_file():
            _copy(bench / name, target, name)
    for table in sorted((bench / "tables").iterdir()):
        if table.stem in {a.name for a in arms} | {"ablation"}:
            _copy(table, target, f"tables/{table.name}")
    for arm in arms:  # each run's wall time, its round-by-round log and its final table with per-case scores
        for seed in seeds:
            _copy_run(bench, run_id(arm.name, seed), target, f"runs/{run_id(arm.name, seed)}")
    return target


def _copy_run(source: Path, run: str, root: Path, name: str) -> bool:
    """Copy the small files of the finished run ``source / run`` (``done.json`` and the log and table it names) to
    ``root / name``; False if unfinished."""
    if not (source / run / DONE).is_file():
        return False
    info = read_done(source, run)  # the names it gives are the benchmark's own, and plain files
    dest = no_link(root, name)  # a linked run folder would be removed or written through below
    shutil.rmtree(dest, ignore_errors=True)  # nothing of an earlier run of this arm and seed is left beside it
    for file in (DONE, info["log"], info["table"]):
        _copy(source / run / file, dest, file)
    return True


def run_spec(scenario: Scenario, arm: Arm, seed: int, extra: str) -> dict:
    """What a run is, apart from where its files go: the run config a federated arm gives ``flwr run`` (and any
    ``--run-config``), or the project-config overrides the centralised arm trains with. ``done.json`` keeps it, so
    a published run is taken over only by a benchmark that would make the same run."""
    if arm.federated:
        return {"run": scenario.arm_run_config(arm, seed), "extra": extra}
    return {"centralised": scenario.centralised_overrides(seed, scenario.num_sites)}


def finished(folder: Path, spec: dict) -> bool:
    """Whether ``folder`` holds a finished run made as ``spec`` says (a run of another config is not this run)."""
    try:
        return _json_object(folder / DONE).get("spec") == spec
    except InputError:  # absent, half written, or not an object: not finished
        return False


def read_meta(folder: Path) -> dict:
    """A benchmark folder's ``bench.json`` (empty when it has none).

    Raises:
        InputError: a link, or anything but a JSON object.
    """
    if not (folder / "bench.json").is_file():
        return {}
    return _json_object(plain_file(folder, "bench.json"))


def same_data(meta: dict, data: ScenarioData) -> bool:
    """Whether a published ``bench.json`` was made on these cases: the same training and test folders by name (a
    phantom folder's name carries the hash of everything it was generated from)."""
    return same_cases(meta, {"data_path": str(data.folder), "test_data_path": str(data.test or "")})


def same_cases(meta: dict, other: dict) -> bool:
    """Whether two ``bench.json`` records name the same training and test folders (see :func:`same_data`)."""
    keys = ("data_path", "test_data_path")
    return [Path(meta.get(k) or "").name for k in keys] == [Path(other.get(k) or "").name for k in keys]


def adopt_published(
    bench: Path,
    published: Path,
    scenario: Scenario,
    data: ScenarioData,
    arms: list[Arm],
    seeds: list[int],
    extra: str,
) -> tuple[list[str], list[str]]:
    """Take the finished runs of a published folder into ``bench`` where ``bench`` lacks them (a benchmark that is
    continued on another day, or in a fresh clone, skips what its published folder already holds), and its
    ``grad_scales.json``. A published run made with another config (its ``done.json`` ``spec``, or none recorded),
    or on other cases (``bench.json``), is not taken. Returns the runs taken and those left."""
    taken, other = [], []
    meta = read_meta(published)
    if (published / "bench.json").is_file() and not same_data(meta, data):
        return taken, [f"all (the published runs used other data: {meta.get('data', '')})"]
    for arm in arms:
        for seed in seeds:
            folder = bench / run_id(arm.name, seed)
            source = published / "runs" / run_id(arm.name, seed)
            spec = run_spec(scenario, arm, seed, extra)
            if finished(folder, spec) or not (source / DONE).is_file():
                continue
            if not finished(source, spec):
                other.append(run_id(arm.name, seed))
            else:  # a run of another config (or half a run) gives way
                _copy_run(published, f"runs/{run_id(arm.name, seed)}", bench, run_id(arm.name, seed))
                taken.append(run_id(arm.name, seed))
    if (published / "grad_scales.json").is_file() and not (bench / "grad_scales.json").is_file():
        bench.mkdir(parents=True, exist_ok=True)
        _copy(plain_file(published, "grad_scales.json"), bench, "grad_scales.json")
    return taken, other
