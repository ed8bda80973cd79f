"""The per-round record of a federated run: JSON lines, a CSV and a Dice-over-rounds plot.

One record per round (round 0 = the initial global model): wall time of the round, bytes sent
to and received from the nodes, per-site training losses and validation Dice, their means
weighted by the sites' case counts (medians over the sites with a robust aggregator), and the
global Dice/HD95 per region (averaged over the evaluated modality subsets) when the server
evaluated that round. Files are rewritten atomically after every round, so a crash never leaves
a truncated log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mstkd.atomic import atomic_path, spreadsheet_text, write_csv, write_text
from mstkd.data.labels import REGIONS
from mstkd.numbers import is_finite, is_number, is_whole
from mstkd.tracking import flatten
from server.replies import SITE_KEYS

Check = Callable[[Any], bool]


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _maybe(check: Check) -> Check:
    return lambda value: value is None or check(value)


def _list_of(check: Check) -> Check:
    return lambda value: isinstance(value, list) and all(check(v) for v in value)


def _fields(required: dict[str, Check], optional: dict[str, Check] | None = None, rest: Check | None = None) -> Check:
    """A dict with every ``required`` key, any ``optional`` one, and any other key only where ``rest`` (its value's
    check) is given; each value as its key's check says."""
    known = {**(optional or {}), **required}

    def check(value: Any) -> bool:
        return (
            isinstance(value, dict)
            and all(k in value for k in required)
            and all((c := known.get(k, rest)) is not None and c(v) for k, v in value.items())
        )

    return check


def _privacy(value: Any) -> bool:
    """The round's privacy settings and spending (:mod:`server.privacy`), with what the report reads."""
    settings = {"mode": _text, "clipping_norm": is_number, "noise_multiplier": is_number, "sampled_nodes": is_whole}
    extra = dict.fromkeys(("noise_stdev", "target_quantile", "clip_lr", "count_noise", "clipping_norm_next"), is_number)
    extra |= {"clipping": _text, "max_epsilon": _maybe(is_number), "epsilon": _maybe(is_number), "releases": is_whole}
    extra |= {"epsilon_note": _text}
    if not _fields(settings | {"delta": is_number}, extra)(value):
        return False
    return ("target_quantile" if value.get("clipping") == "adaptive" else "noise_stdev") in value


_SITE = _fields({"name": _text}, dict.fromkeys(set(SITE_KEYS) - {"name"}, _text), rest=is_number)
"""A node's record: its name, what else it says about itself (text), and its metrics (numbers)."""
_FAILURE = _fields({"stage": _text, "node": _maybe(is_whole), "reason": _text}, {"kind": _text})
_SCORES = {f"{region}_{score}": is_number for region in REGIONS for score in ("dice", "hd95")}
RECORD_SHAPE: dict[str, Check] = {
    "round": is_whole,
    **dict.fromkeys(("bytes_sent", "bytes_received"), is_whole),
    **dict.fromkeys(("wall_seconds", "write_seconds", "eval_seconds"), is_number),
    **dict.fromkeys(("model_norm", "step_norm", "step_relative"), is_number),
    **dict.fromkeys(("skipped", "secure_aggregation"), _text),
    "sites": _fields({}, rest=_SITE),  # keyed by node id
    "failures": _list_of(_FAILURE),
    "rested": _list_of(is_whole),
    "bounded": _list_of(_fields({"node": _maybe(is_whole), "norm": is_finite, "limit": is_finite})),
    "capped": _list_of(_fields({"stage": _text, "node": _maybe(is_whole), "claimed": is_whole, "most": is_whole})),
    "secagg-update": _fields(
        {"norm": is_finite, "claims": is_finite, "bound": is_finite}, {"scaled": lambda v: isinstance(v, bool)}
    ),
    "claims-bounded": _list_of(_fields({"site": _text, "claimed": is_finite, "limit": is_finite})),
    "collapse": _list_of(_fields({"where": _text, "what": _text})),
    "privacy": _privacy,
    "global": _fields({"mean_dice": is_number, **_SCORES}, rest=is_number),  # an HD95 of nothing is NaN: a number too
    **dict.fromkeys(("train", "val"), _fields({}, rest=is_number)),
}
"""What each key of a round's record holds, as the server writes it and as the progress line, the report, the plot
and the phase table read it."""
ROUND_KEYS = frozenset(RECORD_SHAPE)
"""The keys the server writes into a round's record: its columns, which no node's name may take over."""
REQUIRED_KEYS = ("round", "bytes_sent", "bytes_received", "sites", "failures")
MAX_NODE_NAMES = 512
"""The most metric names one node may add to the run log over a run (a node of this version sends about 60): a node
sending names of its own each round would otherwise add columns to ``metrics.csv`` and the trackers every round."""
MAX_LABEL = 64


def check_best(best: Any, last_round: int) -> None:
    """Raise ``ValueError`` unless ``best`` is as the server keeps it after ``last_round``: the site-validation Dice
    of the best round (-1 before any; a NaN would keep every later round from being best) and that round (None
    before any)."""
    if not _fields({}, {"val_mean_dice": is_number, "round": _maybe(is_whole)})(best):
        raise ValueError("not a round and a Dice")
    dice, best_round = best.get("val_mean_dice", -1.0), best.get("round")
    if not -1.0 <= dice <= 1.0 or (best_round is not None and not 0 <= best_round <= last_round):
        raise ValueError("not a round and a Dice")


def check_record(record: Any, server_round: int) -> None:
    """Raise ``ValueError`` naming the first part of ``record`` that is not as this server writes round
    ``server_round``'s record (:data:`RECORD_SHAPE`). A record read back from a file (``resume-from``) is shown in
    the progress line, the report, the plot and the trackers after the run has trained, and must not stop it there.
    """
    if not isinstance(record, dict):
        raise ValueError("not a record")
    if unknown := sorted(str(k) for k in set(record) - ROUND_KEYS):
        raise ValueError(f"an unknown key {unknown[0][:40]!r}")
    if missing := [k for k in REQUIRED_KEYS if k not in record]:
        raise ValueError(f"no {missing[0]!r}")
    if wrong := [k for k, v in record.items() if not RECORD_SHAPE[k](v)]:
        raise ValueError(f"{wrong[0]!r} is not what the server writes there")
    if record["round"] != server_round:
        raise ValueError(f"it says it is round {record['round']}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class RunLog:
    """Collects what happens in each round and writes ``metrics.jsonl``, ``metrics.csv`` and ``dice.png``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.records: dict[int, dict[str, Any]] = {}
        self._started: dict[int, float] = {}
        self.stopped: str | None = None  # why the run ended before its last round, if it did
        self.setup_seconds = 0.0  # the server app's time before its first round (server.phases)
        self._names: dict[str, set[str]] = {}  # node key -> the metric names it has put in the log

    def record(self, server_round: int) -> dict[str, Any]:
        """The (mutable) record of ``server_round``; the round's clock starts at the first call."""
        if server_round not in self.records:
            self._started[server_round] = time.perf_counter()
            self.records[server_round] = {
                "round": server_round,
                "bytes_sent": 0,
                "bytes_received": 0,
                "sites": {},
                "failures": [],
            }
        return self.records[server_round]

    def site(self, server_round: int, node: int | None, name: str) -> dict[str, Any]:
        """The record of one node in one round, keyed by the node id Flower authenticated (``name``, what the node
        calls itself, is kept in it); without a node id (secure aggregation hides it), keyed by ``name``."""
        sites = self.record(server_round)["sites"]
        return sites.setdefault(str(node) if node is not None else name, {"name": name})

    def names_of(self, node: int | None, names: Iterable[str]) -> set[str]:
        """Of ``names``, those one node's record may hold: every name it has put in the log before, and new ones
        while it has put fewer than :data:`MAX_NODE_NAMES` there over the run."""
        known = self._names.setdefault(str(node), set())
        for name in names:
            if len(known) >= MAX_NODE_NAMES:
                break
            known.add(name)
        return known

    def labels(self, server_round: int) -> dict[str, str]:
        """Node key -> the label its columns get: its name (``/`` and ``@`` made ``_``, at most :data:`MAX_LABEL`
        characters, formula-like text escaped), or ``name@node`` where two nodes claim one name or a name is one of
        the server's own columns (:data:`ROUND_KEYS`: a node called ``global`` must not write the held-out Dice)."""
        sites = self.records[server_round]["sites"]
        names = [str(v.get("name", k)).replace("/", "_").replace("@", "_")[:MAX_LABEL] for k, v in sites.items()]
        names = [spreadsheet_text(name) for name in names]
        return {
            key: name if names.count(name) == 1 and name not in ROUND_KEYS else f"{name}@{key}"
            for key, name in zip(sites, names, strict=True)
        }

    def finish(self, server_round: int) -> None:
        """Close the round: stamp its wall time and rewrite the files."""
        rec = self.record(server_round)
        rec["wall_seconds"] = time.perf_counter() - self._started[server_round]
        self.write()

    def progress(self, server_round: int, num_rounds: int) -> str:
        """One line on a finished round: sites, training loss, site-validation Dice, traffic, time, time left."""
        rec = self.records[server_round]
        parts = [f"round {server_round}/{num_rounds}:"]
        if server_round == 0:
            parts.append("initial global model")
        elif "skipped" in rec:
            parts.append(f"skipped ({rec['skipped']}), the global model is unchanged")
        else:
            trained = sum("train-loss" in v for v in rec["sites"].values())
            failed = sorted(
                {str(f["node"]) for f in rec["failures"] if f["stage"] == "train" and f["node"] is not None}
            )
            left_out = [f"failed: {', '.join(failed)}"] if failed else []
            left_out += [f"sat out: {', '.join(map(str, rec['rested']))}"] if rec.get("rested") else []
            parts.append(f"{trained}/{trained + len(failed)} sites" + (f" ({'; '.join(left_out)})" if left_out else ""))
            if "train-loss" in rec.get("train", {}):
                parts.append(f"train loss {rec['train']['train-loss']:.3f}")
            if "val-mean-dice" in rec.get("val", {}):
                parts.append(f"site-val Dice {rec['val']['val-mean-dice']:.3f}")
        parts.append(f"sent {rec['bytes_sent'] / 1e6:.0f} MB, received {rec['bytes_received'] / 1e6:.0f} MB")
        parts.append(f"{rec.get('wall_seconds', 0.0):.0f} s")
        done = [v["wall_seconds"] for r, v in self.records.items() if r > 0 and "wall_seconds" in v]
        left = num_rounds - server_round
        if done and left > 0:
            parts.append(f"about {_duration(left * sum(done) / len(done))} left")
        return " ".join(parts[:1] + [", ".join(parts[1:])])

    def row(self, server_round: int) -> dict[str, Any]:
        """One round, one scalar per column: ``round``, ``bytes_sent``, ..., ``train/<metric>``,
        ``val/<metric>``, ``global/<metric>`` and ``<site>/<metric>``; lists (failures, collapse
        warnings) become their count."""
        rec = self.records[server_round]
        row = flatten({k: v for k, v in rec.items() if k != "sites"})
        labels = self.labels(server_round)
        for key, values in sorted(rec["sites"].items(), key=lambda item: labels[item[0]]):
            site = flatten({k: v for k, v in values.items() if k != "name"}, f"{labels[key]}/")
            row.update({k: spreadsheet_text(v) for k, v in site.items()})
        return row

    def rows(self) -> list[dict[str, Any]]:
        """:meth:`row` for every round: the rows of ``metrics.csv``."""
        return [self.row(r) for r in sorted(self.records)]

    def write(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        ordered = [self.records[r] for r in sorted(self.records)]
        write_text(self.folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in ordered))
        write_csv(self.folder / "metrics.csv", self.rows())
        self.plot()

    def plot(self) -> Path | None:
        """``dice.png``: global Dice per region (and their mean) over the evaluated rounds, and the sites' mean
        validation Dice over every round (a run that scores the held-out set once still shows its learning)."""
        points = [(r, rec["global"]) for r, rec in sorted(self.records.items()) if rec.get("global")]
        val = [
            (r, rec["val"]["val-mean-dice"])
            for r, rec in sorted(self.records.items())
            if "val-mean-dice" in rec.get("val", {})
        ]
        if not points and not val:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        fig, ax = plt.subplots(figsize=(6, 4))
        rounds = [r for r, _ in points]
        for region in REGIONS:
            ax.plot(rounds, [g[f"{region}_dice"] for _, g in points], marker="o", label=f"{region} (test)")
        ax.plot(rounds, [g["mean_dice"] for _, g in points], marker="s", color="black", label="mean (test)")
        if val:
            ax.plot(*zip(*val, strict=True), ls="--", color="grey", marker=".", label="mean (site validation)")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("Dice (mean over evaluated subsets)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title("Global student: held-out test set and the sites' validation cases")
        fig.tight_layout()
        path = self.folder / "dice.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
        return path
