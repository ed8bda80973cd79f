"""Every reply from a node is checked here before any of it reaches the strategy, the run log or the model.

A node may be broken (a diverging site, a float16 overflow, a half-written reply) or hostile, and
the server cannot tell which: so a reply is taken only when it is exactly what an honest node of
this run sends, and a reply that is not costs its sender that round and nothing else.

A train reply must hold exactly these records:

- ``arrays``: the federated arrays that were sent (same names, same shapes), each a float array
  (float16, float32 or float64) whose bytes match its header (:func:`messages.arrays.decode_array`:
  nothing is allocated before that, so a header claiming 10^13 values costs nothing), every
  value finite after conversion to float32; with client-side differential privacy, an update
  within the clipping norm the node was sent (:func:`messages.clipping.unclipped_by`);
- ``metrics``: finite numbers under plain names of its stage (``train-*``, ``update-norm``,
  ``skipped-cases``, ``client-seconds`` and ``norm_bit`` in a train reply, ``val-*`` in an evaluate reply, and
  ``num-examples``; none of the names the server itself writes in a site's record), Dice scores
  and brain shares within [0, 1], the node's clocks within 0 .. a week, ``num-examples`` a whole
  number from 1 to ``max-examples`` (0 is allowed in an evaluate reply: a site without validation
  cases), adaptive clipping's ``norm_bit`` 0 or 1;
- optionally ``site``: short strings under known keys (the site's name, device, modalities);
- optionally ``mstkd-signed``: the node's signature of its claim (:mod:`messages.signed_replies`), which the round
  loop checks where the run lists the case counts the consortium vouches for (``site-cases``), and drops.

An evaluate reply holds ``metrics`` and optionally ``site`` and ``mstkd-signed``. :func:`check_reply` returns a clean
copy (arrays as float32, strings trimmed to printable text) or raises :class:`RefusedReply`
with a short reason, which the round loop records against the node id Flower authenticated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from messages.arrays import WireError, decode_array, nonfinite
from messages.clipping import unclipped_by
from messages.signed_replies import SIGNED, most_cases, record_problem, reply_signer
from mstkd.numbers import is_number

FLOAT_DTYPES = ("float16", "float32", "float64")
SITE_KEYS = ("name", "device", "ray-node", "modalities", "val-collapse")
"""What a node may say about itself; anything else in its ``site`` record is dropped."""
REQUIRED = {"train": ("num-examples", "train-loss"), "evaluate": ("num-examples", "val-mean-dice")}
"""Metrics every honest node sends, which the run log, the progress line and model selection read."""
METRIC_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
STAGE_METRICS = {
    "train": re.compile(rf"num-examples|train-.+|update-norm|skipped-cases|client-seconds|{KEY_NORM_BIT}"),
    "evaluate": re.compile(r"num-examples|val-.+"),
}
"""The metric names of each stage: a site's record holds both stages' metrics, so an evaluate reply that named a
train metric would overwrite it."""
RESERVED = frozenset({*SITE_KEYS, "train-examples", "evaluate-examples"})
"""Names in a site's record that the server writes itself (its text, and the case counts it checked)."""
CLOCKS = re.compile(r"train-time-.+|val-time-.+|train-seconds|client-seconds")
MAX_SECONDS = 7 * 24 * 3600.0
"""A node's clock for one message (:mod:`server.phases` sums them over sites and rounds)."""
SHARES = re.compile(r"val-mean-dice|val-dice-.+|val-share-.+")
"""Metrics that are Dice scores or shares of the brain: each must lie in [0, 1] (model selection reads them)."""
BITS = (KEY_NORM_BIT,)
"""Metrics that are 0 or 1 (adaptive clipping counts the replies whose bit is 1)."""
MAX_METRICS = 256
MAX_TEXT = 200


class RefusedReply(ValueError):
    """A reply that is not what an honest node sends; the message is the reason, in a few words."""


@dataclass(frozen=True)
class SiteCases:
    """Run config ``site-cases`` (:mod:`messages.signed_replies`): the cases each node key brings, this run's id,
    which every signature names, and the run's ``data.split.val_fraction``, which divides them between stages."""

    run_id: int
    cases: Mapping[bytes, int]
    val_fraction: float

    def most(self, key: bytes, stage: str) -> int:
        """The most cases a reply of ``stage`` signed by ``key`` weighs (0 for a key the list does not hold)."""
        return most_cases(self.cases[key], stage, self.val_fraction) if key in self.cases else 0

    def vouched(self, raw: RecordDict, node: int, stage: str, server_round: int, claimed: int) -> tuple[bytes, int]:
        """The key that signed a reply's claim of ``claimed`` cases (``raw``: the reply as it came), and the most
        cases that reply weighs.

        Raises:
            RefusedReply: not signed, by a key the list does not hold, or not for this run, node, round and count.
        """
        try:
            signer = reply_signer(raw, self.cases, self.run_id, node, stage, server_round, claimed)
        except ValueError as exc:
            raise RefusedReply(f"{exc} (site-cases)") from None
        except Exception as exc:  # a signature no check foresaw must cost its sender, not the run
            raise RefusedReply(f"its signature does not read ({type(exc).__name__}; site-cases)") from None
        return signer, self.most(signer, stage)


def printable(text: object, limit: int = MAX_TEXT) -> str:
    """``text`` as one line of printable characters, at most ``limit`` long (what a log or table may show).

    Only the first ``limit`` characters are looked at: a node's text may be as long as a message allows.
    """
    text = str(text)
    cut = len(text) > limit
    clean = "".join(c if c.isprintable() else " " for c in text[: limit - 3 if cut else limit])
    return clean + "..." if cut else clean


@dataclass(frozen=True)
class ReplyRules:
    """What a good reply of this round looks like."""

    shapes: Mapping[str, tuple[int, ...]]  # the federated arrays sent to the nodes, by name
    max_examples: int
    required: tuple[str, ...] = ()  # metric keys a train reply must carry besides REQUIRED's
    clip: float | None = None  # client-side DP: the norm every update was to be clipped to ...
    sent: Mapping[str, np.ndarray] | None = None  # ... from these arrays, as they were sent
    site_cases: SiteCases | None = None  # run config site-cases: each node's count at most its key's listing

    @classmethod
    def of(
        cls,
        arrays: ArrayRecord,
        max_examples: int,
        required: Iterable[str] = (),
        sent: RecordDict | None = None,
        site_cases: SiteCases | None = None,
    ) -> ReplyRules:
        """The rules for replies to a round of ``arrays``; ``sent``, the content of the train messages (the server's
        own), names the clipping norm when the nodes clip their updates (client-side differential privacy)."""
        config = sent.config_records.get("config") if sent is not None else None
        clip = sent_arrays = None
        if config is not None and KEY_CLIPPING_NORM in config:
            clip = float(config[KEY_CLIPPING_NORM])  # type: ignore[arg-type]
            sent_arrays = {k: decode_array(v, "f") for k, v in sent["arrays"].items()}  # views of the sent bytes
        shapes = {k: tuple(v.shape) for k, v in arrays.items()}
        return cls(shapes, int(max_examples), tuple(required), clip, sent_arrays, site_cases)


def check_reply(content: RecordDict, stage: str, rules: ReplyRules) -> RecordDict:
    """A clean copy of a ``train`` or ``evaluate`` reply's content (see the module doc).

    Raises:
        RefusedReply: the first thing that is not as it should be.
    """
    wanted = {"arrays", "metrics"} if stage == "train" else {"metrics"}
    names = set(content.keys())
    if missing := sorted(wanted - names):
        raise RefusedReply(f"no {missing[0]!r} record")
    if extra := sorted(names - wanted - {"site", SIGNED}):
        raise RefusedReply(f"unexpected record {printable(extra[0], 40)!r}")
    if SIGNED in names and (problem := record_problem(content[SIGNED])):
        raise RefusedReply(problem)
    out = RecordDict()
    if stage == "train":
        arrays = content["arrays"]
        if not isinstance(arrays, ArrayRecord):
            raise RefusedReply("'arrays' is not an array record")
        wire, floats = _arrays(arrays, rules.shapes)
        if rules.clip is not None and rules.sent is not None:
            if (beyond := unclipped_by(rules.sent, wire, rules.clip)) is not None:
                clip = rules.clip
                raise RefusedReply(f"its update is {beyond:.3g} longer than the clipping norm {clip:g}: not clipped")
        out["arrays"] = ArrayRecord({k: Array(v) for k, v in floats.items()})
    metrics = content["metrics"]
    if not isinstance(metrics, MetricRecord):
        raise RefusedReply("'metrics' is not a metric record")
    out["metrics"] = _metrics(metrics, stage, rules)
    if "site" in names:
        site = content["site"]
        if not isinstance(site, ConfigRecord):
            raise RefusedReply("'site' is not a config record")
        out["site"] = ConfigRecord({k: printable(site[k]) for k in SITE_KEYS if isinstance(site.get(k), str)})
    return out


def _arrays(
    record: ArrayRecord, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The arrays of a train reply as they came (each in its float dtype) and in float32, where every value must be
    finite."""
    got = list(record.keys())
    if missing := [k for k in shapes if k not in record]:
        raise RefusedReply(f"{len(missing)} federated arrays missing (first: {missing[0]})")
    if extra := [k for k in got if k not in shapes]:
        raise RefusedReply(f"{len(extra)} arrays that were not sent (first: {printable(extra[0], 60)!r})")
    wire, floats = {}, {}
    for name in shapes:  # the order sent
        array = record[name]
        if str(array.dtype) not in FLOAT_DTYPES:
            raise RefusedReply(f"{name} has dtype {printable(array.dtype, 20)}, not a float")
        if tuple(array.shape) != shapes[name]:
            raise RefusedReply(f"{name} has shape {printable(tuple(array.shape), 60)}, expected {shapes[name]}")
        try:
            values = decode_array(array, kinds="f")
        except WireError as exc:
            raise RefusedReply(f"{name}: {exc}") from None
        as32 = values.astype(np.float32)  # a float64 beyond float32's range becomes inf, and is refused below
        if bad := nonfinite(as32):
            raise RefusedReply(f"{bad} non-finite values in {name}")
        wire[name], floats[name] = values, as32
    return wire, floats


def metric_problem(stage: str, key: object, value: object) -> str | None:
    """Why one metric of a ``stage`` reply cannot be taken (a name that is not plain or not its stage's, a value
    that is not a finite number, a clock out of range), or None. Its range as a Dice or share is checked apart."""
    if not isinstance(key, str) or not METRIC_NAME.fullmatch(key):
        return f"metric name {printable(key, 40)!r}"
    if key in RESERVED or not STAGE_METRICS[stage].fullmatch(key):
        return f"metric name {key!r} is not one of {stage} metrics"
    if not is_number(value):
        return f"metric {key} is not a number"
    if not math.isfinite(value):
        return f"metric {key} is not finite"
    if CLOCKS.fullmatch(key) and not 0.0 <= value <= MAX_SECONDS:
        return f"metric {key} = {printable(value, 30)} s lies outside 0 .. a week"
    return None


def _metrics(record: MetricRecord, stage: str, rules: ReplyRules) -> MetricRecord:
    if len(record) > MAX_METRICS:
        raise RefusedReply(f"{len(record)} metrics (at most {MAX_METRICS})")
    for key, value in record.items():
        if problem := metric_problem(stage, key, value):
            raise RefusedReply(problem)
    clean = dict(record.items())
    if outside := [k for k, v in clean.items() if SHARES.fullmatch(k) and not 0.0 <= v <= 1.0]:
        raise RefusedReply(f"metric {outside[0]} = {printable(clean[outside[0]], 30)} lies outside [0, 1]")
    if not_bit := [k for k in BITS if k in clean and clean[k] not in (0, 1)]:
        raise RefusedReply(f"metric {not_bit[0]} = {printable(clean[not_bit[0]], 30)} is not 0 or 1")
    required = (*REQUIRED[stage], *(rules.required if stage == "train" else ()))
    if missing := [k for k in required if k not in clean]:
        raise RefusedReply(f"no {missing[0]} metric")
    examples = clean["num-examples"]
    least = 1 if stage == "train" else 0
    if float(examples) != int(examples) or not least <= examples <= rules.max_examples:
        raise RefusedReply(
            f"num-examples {printable(examples, 30)} is not a whole number from {least} to {rules.max_examples}"
        )
    clean["num-examples"] = int(examples)
    return MetricRecord(clean)


def common_metrics(contents: list[RecordDict]) -> None:
    """Keep in each content's ``metrics`` only the keys every content has, so that aggregation never fails on
    replies whose metric names differ (a node of another version, or one that adds or drops a name)."""
    if not contents:
        return
    shared = set.intersection(*(set(c["metrics"].keys()) for c in contents))
    for content in contents:
        metrics = content["metrics"]
        content["metrics"] = MetricRecord({k: v for k, v in metrics.items() if k in shared})


def finite_arrays(arrays: ArrayRecord) -> bool:
    """Whether every value of ``arrays`` (the server's own, e.g. an aggregate) is finite."""
    return not any(nonfinite(decode_array(v, kinds="f")) for v in arrays.values())
