"""Client-side differential privacy's contract: what a clipped update is, on both ends of a message.

With ``dp='client'`` the server sends each site a clipping norm ``C`` beside the global arrays ``s``
(Flower's ``KEY_CLIPPING_NORM``). The site trains to ``r`` and sends ``s + update`` in its
transport dtype with the update no longer than ``C`` (:func:`clip_update`). The noise the server
adds is calibrated to ``C``, so the server checks every reply (:func:`unclipped_by`): a node that
skipped clipping would move the average without bound.

Both ends measure the update the same way: in float64, from the values as they travel. Rounding the
clipped values to the transport dtype moves each weight by up to half its spacing, which at float16
and a model norm of 68 can lengthen the update by about 0.03; so the node aims a little lower until
the rounded update is within ``C``, and the server allows nothing beyond ``C`` but float64's own
error. (Flower's clipping mods compute the norm in the arrays' dtype, which for float16 arrays is
0.3 % short at 5 M weights and infinite once the norm passes 256, so that such an update was scaled
to nothing; and they clip before rounding.)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

RELATIVE_SLACK = 1e-6
"""What float64 arithmetic on the two ends may differ by, relative to the norm."""
AIM = 1 - 1e-4
"""Where the node aims when rounding took its update past the norm: this share of the norm."""
TRIES = 20


def update_norm(sent: Mapping[str, np.ndarray], returned: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of ``returned - sent`` over every array, in float64 (one array's copy at a time)."""
    return float(np.sqrt(sum(np.sum((np.asarray(v, np.float64) - sent[k]) ** 2) for k, v in returned.items())))


def scaled_update(
    sent: Mapping[str, np.ndarray], returned: Mapping[str, np.ndarray], scale: float
) -> dict[str, np.ndarray]:
    """``sent`` plus ``scale`` times the update ``returned - sent``, computed in float64, each array in ``returned``'s
    dtype."""
    out = {}
    for name, values in returned.items():
        base = np.asarray(sent[name], np.float64)
        out[name] = (base + (np.asarray(values, np.float64) - base) * scale).astype(np.asarray(values).dtype)
    return out


def clip_update(
    sent: Mapping[str, np.ndarray], returned: Mapping[str, np.ndarray], norm: float
) -> tuple[dict[str, np.ndarray], bool]:
    """``returned`` with its update from ``sent`` scaled down where it is longer than ``norm``, so that the update
    of the result, each array in its own dtype, is at most ``norm`` long; and whether it was scaled (adaptive
    clipping's ``norm_bit``). Where rounding to the dtype leaves no room (a norm below its spacing), no update."""
    length = update_norm(sent, returned)
    if length <= norm:
        return {k: np.asarray(v) for k, v in returned.items()}, False
    target = norm
    for _ in range(TRIES):
        out = scaled_update(sent, returned, target / length)
        rounded = update_norm(sent, out)
        if rounded <= norm:
            return out, True
        target *= AIM * norm / rounded
    return scaled_update(sent, returned, 0.0), True


def unclipped_by(sent: Mapping[str, np.ndarray], returned: Mapping[str, np.ndarray], norm: float) -> float | None:
    """How far the update of a reply ``returned`` to ``sent`` lies beyond clipping norm ``norm``; None when it lies
    within (float64's own error allowed for)."""
    length = update_norm(sent, returned)
    allowed = norm * (1 + RELATIVE_SLACK)
    return length - allowed if length > allowed else None
