"""Benchmark scenarios (``simulations/scenarios/*.yaml``) and the arms a benchmark compares.

A scenario names its sites either by relative sizes (``sites.sizes: [8, 4, 2, 1]``) or by a
FeTS partition CSV (``sites.partitioning: fets/partitioning_1.csv``, relative to
``simulations/``). It maps onto data in one of two ways:

- **real data** (``--data-path``): the cases of that folder, one node per partition of the
  scenario's CSV (or of ``--partitioning``, or of ``<data>/partitioning.csv``);
- **phantoms** (default): a phantom federation with as many sites and the same relative site
  sizes, scaled down to ``phantom.cases`` (each site keeps at least one case), generated once;
  with ``phantom.test_cases``, also a held-out test set of that many further cases drawn from the
  same sites in the same proportions (the global model is scored on it, no site trains on it).

``run`` is the Flower run config shared by every federated arm; an arm adds its own keys
(:data:`ARMS`). The centralised arm pools every site's training cases and trains for as many
epochs (and steps) as a federated arm does in all its rounds, or for ``centralised.epochs`` where the
scenario gives it (a ceiling trained until it levels off, chosen on validation data). A robustness arm also makes one
site hostile (:mod:`simulations.adversary`): that site's every train reply is poisoned.

``compare-with`` names a published scenario on the same test cases whose sites have every modality: the report
then asks whether MST-KDNet's advantage over student-only differs from that scenario's, over all subsets and over
the subsets that the same number of this scenario's sites can train (``run.drop-modalities``).
"""

from __future__ import annotations

import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mstkd.data.partitions import read_partitions
from mstkd.data.sites import parse_dropped
from mstkd.errors import InputError, first_line
from mstkd.modalities import FULL, SUBSETS
from mstkd.numbers import is_whole
from mstkd.phantoms import ensure_phantoms
from mstkd.runconfig import RunConfig

HERE = Path(__file__).resolve().parent
SCENARIOS = HERE / "scenarios"


@dataclass(frozen=True)
class Arm:
    """One thing a benchmark compares: how it trains and what it changes in the run config."""

    name: str
    label: str  # how tables name it
    federated: bool = True
    run: dict[str, Any] = field(default_factory=dict)  # run-config keys
    overrides: str = ""  # project-config dot-list, appended to the scenario's
    attack: str = ""  # a poisoning attack of simulations.adversary, by the HOSTILE site


TERM_ARMS = {
    "no-attention": ("w/o attention distillation (EVD)", "attention"),
    "no-transformer-features": ("w/o transformer features", "transformer_features"),
    "no-consistency": ("w/o consistency", "consistency_max"),
    "no-kl": ("w/o KL", "kl"),
    "no-gram": ("w/o Gram", "gram"),
    "no-adversarial": ("w/o adversarial", "adversarial"),
    "no-content": ("w/o content (SMU-Net)", "content"),
}
"""One arm per loss term of the full method: arm name -> (label, the ``loss`` weight it sets to 0). Groups:
MS-TKD = attention + transformer features, DMLD = consistency + KL, GSM = Gram + adversarial; content is
SMU-Net's."""
TERM_GROUPS = {
    "no-mstkd": ("no-attention", "no-transformer-features"),
    "no-dmld": ("no-consistency", "no-kl"),
    "no-gsm": ("no-gram", "no-adversarial"),
}
"""Which per-term arms make up each mechanism-group arm."""

ROBUST_STRATEGIES = {
    "mstkd": ("FedAvg", {}),
    "fedmedian": ("FedMedian", {"strategy": "fedmedian"}),
    # with four sites a share of 0.25 trims one reply at either end (0.2 would trim none: int(0.2 x 4) = 0)
    "fedtrimmedavg": ("FedTrimmedAvg (0.25)", {"strategy": "fedtrimmedavg", "trim-beta": 0.25}),
    "krum": ("Krum (f = 1)", {"strategy": "krum", "malicious-nodes": 1}),
    "multikrum": ("MultiKrum (f = 1, 3 of 4)", {"strategy": "multikrum", "malicious-nodes": 1}),
    "bounded": ("FedAvg, update-bound 3", {"update-bound": 3.0}),
}
"""The aggregators of the robustness benchmark: arm name of the honest run -> (label, run config)."""
ATTACK_LABELS = {"scale": "update x100", "sign-flip": "sign-flipped update", "noise": "N(0, 1) noise on every weight"}
HOSTILE = 1
"""The hostile site's partition in robustness arms: the second largest of phantom-4 (4 of 15 cases)."""


def _robust_arms() -> list[Arm]:
    arms = []
    for name, (label, run) in ROBUST_STRATEGIES.items():
        if name != "mstkd":
            arms.append(Arm(name, f"Federated MST-KDNet ({label})", run=run))
        for attack, what in ATTACK_LABELS.items():
            arms.append(
                Arm(
                    f"{name}+{attack}",
                    f"{label}, site {HOSTILE + 1} hostile ({what})",
                    run=run,
                    attack=attack,
                )
            )
    return arms


ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm("centralised", "Centralised MST-KDNet (pooled data)", federated=False),
        Arm("mstkd", "Federated MST-KDNet (FedAvg)"),
        Arm("student", "Federated student only (no teacher)", overrides="train.mode=student"),
        *(Arm(name, label, overrides=f"loss.{key}=0") for name, (label, key) in TERM_ARMS.items()),
        Arm("no-mstkd", "w/o MS-TKD (attention + transformer features)", overrides="loss.mstkd=false"),
        Arm("no-dmld", "w/o DMLD (consistency + KL)", overrides="loss.dmld=false"),
        Arm("no-gsm", "w/o GSM (Gram + adversarial)", overrides="loss.gsm=false"),
        Arm("fedprox", "Federated MST-KDNet (FedProx)", run={"strategy": "fedprox", "proximal-mu": 0.01}),
        Arm("fedadam", "Federated MST-KDNet (FedAdam)", run={"strategy": "fedadam", "server-lr": 0.01}),
        Arm("fedyogi", "Federated MST-KDNet (FedYogi)", run={"strategy": "fedyogi", "server-lr": 0.01}),
        Arm("fedavgm", "Federated MST-KDNet (FedAvgM)", run={"strategy": "fedavgm", "server-momentum": 0.9}),
        *(
            Arm(
                f"local-{e}",
                f"Federated MST-KDNet (FedAvg, {e} local epochs per round)",
                run={"local-epochs": float(e)},
            )
            for e in (2, 4)
        ),
        Arm(
            "rounds-40",
            "Federated MST-KDNet (FedAvg, 40 rounds: twice the local epochs, as many as the centralised arm)",
            run={"num-server-rounds": 40},
        ),
        Arm(
            "dp-clip",
            "Federated MST-KDNet, updates clipped (DP without noise)",
            run={"dp": "server", "dp-clip": 2.0, "dp-noise": 0.0},
        ),
        Arm("dp", "Federated MST-KDNet, server-side DP", run={"dp": "server", "dp-clip": 2.0, "dp-noise": 0.001}),
        Arm(
            "dp-adaptive",
            "Federated MST-KDNet, server-side DP, adaptive clipping",
            run={"dp": "server", "dp-clipping": "adaptive", "dp-clip": 2.0, "dp-noise": 0.001},
        ),
        Arm("lean-state", "Federated MST-KDNet, node state in half precision", overrides="train.state_precision=half"),
        *_robust_arms(),
    )
}
STRATEGY_ARMS = ("fedprox", "fedavgm", "fedadam", "fedyogi", "local-2", "local-4")
"""Arms that change how the federation trains (strategy, or local epochs per round at equal total epochs: a
``local-<e>`` arm runs ``rounds / e`` rounds), chosen between on validation data (:mod:`simulations.comparisons`)."""
LONGER_ARMS = ("rounds-40",)
"""Arms that train longer than the scenario's schedule (not equal compute): whether the federation has levelled off
by the scenario's last round, judged on validation data."""
ABLATIONS = ("no-mstkd", "no-gsm", "no-dmld", "mstkd")
"""The rows of the Table-5-style ablation table (the paper's mechanism groups), in its order (full method last)."""


@dataclass
class Scenario:
    name: str
    description: str
    sizes: list[int]  # cases per site in the scenario's own terms (the CSV's, or the relative sizes)
    partitioning: Path | None  # the scenario's CSV, when it names one
    phantom: dict[str, Any]
    run: dict[str, Any]
    arms: list[str]
    source: Path
    centralised_epochs: int | None = None  # None: as many as a federated arm trains in all its rounds
    compare_with: str | None = None  # a published scenario on the same test cases, every site with every modality

    @property
    def num_sites(self) -> int:
        return len(self.sizes)

    @property
    def config(self) -> RunConfig:
        """The scenario's run config, typed (keys it does not give take their defaults)."""
        return RunConfig.parse(self.run)

    def arm_run_config(self, arm: Arm, seed: int) -> dict[str, Any]:
        """The run-config keys ``arm`` sets under ``seed`` (without paths): what ``flwr run`` is given. An arm that
        trains more local epochs per round runs proportionally fewer rounds: the same epochs in all."""
        overrides = " ".join(filter(None, [self.config.overrides, arm.overrides]))
        given = {**self.run, **arm.run, "seed": seed, "min-nodes": self.num_sites, "overrides": overrides}
        if "local-epochs" in arm.run:
            epochs = self.config.num_server_rounds * self.config.local_epochs
            given["num-server-rounds"] = max(1, round(epochs / RunConfig.parse(given).local_epochs))
        RunConfig.parse(given)  # an arm's keys are checked like the scenario's
        return given

    def sites_training(self) -> dict[str, int]:
        """Per subset (by name), how many sites have its every modality, so that their students train it."""
        kept = parse_dropped(self.config.drop_modalities)  # site ids checked against the sites' when loaded
        have = [*kept.values(), *[FULL] * (self.num_sites - len(kept))]
        return {s.name: sum(s.issubset(h) for h in have) for s in SUBSETS}

    @property
    def federated_train_epochs(self) -> int:
        """The epochs a federated arm trains in all its rounds (with ``local-steps``, one epoch per round)."""
        run = self.config
        return (
            run.num_server_rounds if run.local_steps else max(int(round(run.num_server_rounds * run.local_epochs)), 1)
        )

    @property
    def centralised_train_epochs(self) -> int:
        """The epochs the centralised arm trains: ``centralised.epochs``, else as many as a federated arm trains."""
        return self.centralised_epochs or self.federated_train_epochs

    def centralised_overrides(self, seed: int, num_sites: int) -> list[str]:
        """Project-config overrides of the centralised arm: a federated arm's budget in epochs (and steps), or
        ``centralised.epochs`` where the scenario gives it."""
        run = self.config
        out = [
            f"model={run.model}",
            f"train.epochs={self.centralised_train_epochs}",
            f"train.seed={seed}",
            "train.eval_every=1",
            "train.eval_subsets=full",
            f"train.lr={run.lr}",
        ]
        if run.local_steps:  # a federated round is local-steps on every site
            out.append(f"train.steps_per_epoch={run.local_steps * num_sites}")
        return [*out, *shlex.split(run.overrides)]


def scenario_path(name: str | Path) -> Path:
    """A scenario file: a path, or the name of one in ``simulations/scenarios``."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.resolve()
    candidate = SCENARIOS / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in SCENARIOS.glob("*.yaml")))
    raise InputError(f"unknown scenario {name!r}; known: {known} (or a path to a .yaml file)")


def _check_compare_with(path: Path, raw: dict, name: str) -> None:
    """``compare-with`` must name another scenario that differs from this one only in having no sites that lack
    modalities: the same sites, phantoms and run config but for ``drop-modalities``."""
    other = SCENARIOS / f"{name}.yaml"
    if name == path.stem or not other.is_file():
        raise InputError(f"{path}: compare-with must name another scenario of {SCENARIOS}, not {name!r}")
    theirs = _read_yaml(other)
    if (theirs.get("run") or {}).get("drop-modalities"):
        raise InputError(f"{path}: compare-with {name!r}: that scenario's sites lack modalities too")
    differ = [key for key in ("sites", "phantom") if raw.get(key) != theirs.get(key)]
    runs = [{k: v for k, v in (r.get("run") or {}).items() if k != "drop-modalities"} for r in (raw, theirs)]
    differ += sorted(k for k in set(runs[0]) | set(runs[1]) if runs[0].get(k) != runs[1].get(k))
    if differ:
        raise InputError(
            f"{path}: compare-with {name!r}: the two scenarios may differ only in drop-modalities, "
            f"not in {', '.join(differ)}"
        )


def _read_yaml(path: Path) -> dict:
    """A scenario file as a plain mapping, or :class:`InputError` in one line: no interpolation (``${oc.env:...}``
    would put this machine's environment into the report and past the run config's own refusal of ``${``)."""
    text = path.read_text(errors="replace")
    if "${" in text:
        raise InputError(f"{path}: ${{...}} interpolation is not allowed in a scenario")
    try:
        raw = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    except Exception as exc:  # PyYAML's errors (a Python tag, an alias bomb) and OmegaConf's
        raise InputError(f"{path}: not a readable scenario ({first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: not a mapping of scenario keys")
    return raw


def load_scenario(name: str | Path) -> Scenario:
    path = scenario_path(name)
    raw = _read_yaml(path)
    unknown = set(raw) - {"description", "sites", "phantom", "run", "arms", "centralised", "compare-with"}
    if unknown:
        raise InputError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
    centralised = raw.get("centralised") or {}
    if not isinstance(centralised, dict):
        raise InputError(f"{path}: centralised must be a mapping such as 'centralised: {{epochs: 40}}'")
    if set(centralised) - {"epochs"}:
        raise InputError(f"{path}: unknown centralised keys {', '.join(sorted(set(centralised) - {'epochs'}))}")
    epochs = centralised.get("epochs")
    if epochs is not None and (not is_whole(epochs) or epochs < 1):
        raise InputError(f"{path}: centralised.epochs must be a positive whole number, not {epochs!r}")
    phantom = dict(raw.get("phantom") or {})
    unknown = set(phantom) - {"cases", "shape", "seed", "test_cases"}
    if unknown:
        raise InputError(
            f"{path}: unknown phantom keys {', '.join(sorted(unknown))} (known: cases, shape, seed, test_cases)"
        )
    sites = raw.get("sites") or {}
    csv = None
    if "partitioning" in sites:
        csv = (HERE / str(sites["partitioning"])).resolve()
        if not csv.is_relative_to(HERE):  # a scenario from elsewhere names its CSV; a site's own goes in --partitioning
            named = sites["partitioning"]
            raise InputError(f"{path}: sites.partitioning must name a file under simulations/, not {named!r}")
        partitions = read_partitions(csv)
        counts = Counter({site: len(cases) for site, cases in partitions.sites.items()})
        sizes = [counts[s] for s in partitions.sites]
    elif "sizes" in sites:
        sizes = [int(s) for s in sites["sizes"]]
    else:
        raise InputError(f"{path}: sites needs 'sizes' or 'partitioning'")
    if not sizes or min(sizes) <= 0:
        raise InputError(f"{path}: every site needs a positive size")
    ids = list(partitions.sites) if csv else [str(i) for i in range(1, len(sizes) + 1)]
    try:
        run = RunConfig.parse(raw.get("run") or {})
        parse_dropped(run.drop_modalities, ids)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    compare_with = raw.get("compare-with")
    if compare_with is not None:
        compare_with = str(compare_with)
        _check_compare_with(path, raw, compare_with)
    arms = [str(a) for a in raw.get("arms") or ARMS]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise InputError(f"{path}: unknown arm {bad[0]!r}; known: {', '.join(ARMS)}")
    return Scenario(
        name=path.stem,
        description=str(raw.get("description", "")),
        sizes=sizes,
        partitioning=csv,
        phantom=phantom,
        run=dict(raw.get("run") or {}),
        arms=arms,
        source=path,
        centralised_epochs=epochs,
        compare_with=compare_with,
    )


def parse_arms(spec: str | None, scenario: Scenario) -> list[Arm]:
    """``"mstkd,student"`` -> those arms; ``None``/``"all"`` -> the scenario's."""
    names = scenario.arms if spec in (None, "", "all") else [a.strip() for a in str(spec).split(",") if a.strip()]
    bad = [a for a in names if a not in ARMS]
    if bad:
        raise InputError(f"unknown arm {bad[0]!r}; known: {', '.join(ARMS)}")
    return [ARMS[a] for a in names]


@dataclass(frozen=True)
class ScenarioData:
    """Where a scenario's cases are: the training federation, its partition CSV and, for phantoms with
    ``phantom.test_cases``, a held-out test federation of the same sites that no site trains on."""

    folder: Path
    partitioning: Path | None
    test: Path | None
    description: str

    def run_paths(self) -> dict[str, str]:
        """The run-config keys that point a federated run at these cases."""
        return {
            "data-path": str(self.folder),
            "partitioning": str(self.partitioning or ""),
            "test-data-path": str(self.test or ""),
        }


def scenario_data(
    scenario: Scenario, work_dir: Path, data_path: Path | None = None, partitioning: Path | None = None
) -> ScenarioData:
    """The scenario's cases: real data, or its phantom federation (and held-out phantom test set)."""
    if data_path is not None:
        if not data_path.is_dir():
            raise InputError(f"{data_path}: data folder not found")
        csv = partitioning or scenario.partitioning
        if csv is None and (data_path / "partitioning.csv").is_file():
            csv = data_path / "partitioning.csv"
        return ScenarioData(data_path.resolve(), csv, None, f"real data from {data_path}")
    shape = tuple(int(v) for v in scenario.phantom.get("shape", [96, 96, 64]))
    cases = int(scenario.phantom.get("cases", 4 * scenario.num_sites))
    test_cases = int(scenario.phantom.get("test_cases", 0))
    common = {
        "sites": scenario.num_sites,
        "shape": shape,
        "seed": int(scenario.phantom.get("seed", 0)),
        "site_sizes": [float(s) for s in scenario.sizes],
        "progress": True,
    }
    folder = ensure_phantoms(work_dir / "phantoms", cases=cases, **common)  # type: ignore[arg-type]
    sizes = scenario.sizes if len(scenario.sizes) <= 8 else "the partition CSV"
    text = (
        f"phantom federation of {cases} cases ({'x'.join(map(str, shape))} voxels) over {scenario.num_sites} sites "
        f"sized in proportion to {sizes}"
    )
    test = None
    if test_cases:  # new draws of the same site styles: case numbers after the training federation's
        test = ensure_phantoms(work_dir / "phantoms", cases=test_cases, first_case=cases + 1, **common)  # type: ignore[arg-type]
        text += f"; held-out test set: {test_cases} further cases of the same sites, in the same proportions"
    return ScenarioData(folder, folder / "partitioning.csv", test, text)
