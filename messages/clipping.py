"""Client-side differential privacy's contract: what a clipped update is, on both ends of a message.

With ``dp='client'`` the server sends each site a clipping norm ``C`` beside the global arrays ``s``
(Flower's ``KEY_CLIPPING_NORM``). The site trains to ``r``, scales its update ``r - s`` down to L2
norm ``C`` where it is longer (:func:`clip_update`), and sends ``s + update`` in its transport dtype.
The noise the server adds is calibrated to ``C``, so the server checks every reply
(:func:`unclipped_by`): a node that skips clipping would move the average without bound.

The norm is computed in float64 on both ends. Flower's clipping mods compute it in the arrays' own
dtype, which for float16 arrays is 0.3 % short at 5 M weights and infinite once the norm passes
256 (the squares overflow), so that such an update is scaled to nothing. The reply is rounded to
its transport dtype after clipping, which moves each weight by at most half its spacing: the server
allows exactly that on top of ``C`` (at float16 and a model norm of 68, about 0.03), and that slack
is part of what one site can move the average by.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

RELATIVE_SLACK = 1e-6
"""What float64 arithmetic on either end may add to a clipped update's norm, relative to the norm."""


def update_norm(sent: Mapping[str, np.ndarray], returned: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of ``returned - sent`` over every array, in float64 (one array's copy at a time)."""
    return float(np.sqrt(sum(np.sum((np.asarray(v, np.float64) - sent[k]) ** 2) for k, v in returned.items())))


def clip_update(
    sent: Mapping[str, np.ndarray], returned: Mapping[str, np.ndarray], norm: float
) -> tuple[dict[str, np.ndarray], bool]:
    """``returned`` with its update from ``sent`` scaled down to L2 norm ``norm`` where it is longer, each array in
    its own dtype; and whether it was scaled (adaptive clipping's ``norm_bit``)."""
    length = update_norm(sent, returned)
    if length <= norm:
        return {k: np.asarray(v) for k, v in returned.items()}, False
    scale = norm / length
    out = {}
    for name, values in returned.items():
        base = np.asarray(sent[name], np.float64)
        out[name] = (base + (np.asarray(values, np.float64) - base) * scale).astype(np.asarray(values).dtype)
    return out, True


def unclipped_by(sent: Mapping[str, np.ndarray], returned: Mapping[str, np.ndarray], norm: float) -> float | None:
    """How far the update of a reply ``returned`` (arrays in the dtype they came in) to ``sent`` lies beyond clipping
    norm ``norm`` once rounding to that dtype is allowed for (see the module doc); None when it lies within."""
    length = update_norm(sent, returned)
    rounding = np.sqrt(sum(np.sum(_half_spacing(np.asarray(v)) ** 2) for v in returned.values()))
    allowed = norm * (1 + RELATIVE_SLACK) + float(rounding)
    return length - allowed if length > allowed else None


def _half_spacing(values: np.ndarray) -> np.ndarray:
    """Half the distance from each value to the next one of its dtype (float64): how far rounding to that dtype moved
    it at most. At the dtype's largest value, whose next one would be infinite, the spacing below it."""
    with np.errstate(over="ignore"):
        spacing = np.spacing(np.abs(values)).astype(np.float64)
    top = float(np.spacing(np.nextafter(np.finfo(values.dtype).max, 0, dtype=values.dtype)))
    return np.minimum(spacing, top) / 2
