"""Label conventions and the three evaluated tumour regions ET, TC, WT.

Two on-disk conventions exist:

=============  ====  ====  ====  ====  ========  ===========  ==============
convention      1     2     3     4     ET        TC           WT
=============  ====  ====  ====  ====  ========  ===========  ==============
``fets``        NCR   ED    --    ET    {4}       {1, 4}       {1, 2, 4}
``brats2023``   NETC  SNFH  ET    RC    {3}       {1, 3}       {1, 2, 3}
=============  ====  ====  ====  ====  ========  ===========  ==============

``fets`` covers FeTS 2021-2024 and BraTS 2018-2021; ``brats2023`` covers BraTS 2023
and 2024, where label 4 (resection cavity, post-treatment data only) belongs to no
tumour region. Internally every target is a ``3 x H x W x D`` boolean stack in the
canonical region order :data:`REGIONS` = (ET, TC, WT).

The network predicts four mutually exclusive classes, :data:`CLASSES` = (NETC, ED, ET, BG),
as the official MST-KDNet code does; the regions follow from them (WT = NETC | ED | ET,
TC = NETC | ET, ET = ET). The resection cavity of BraTS 2023+ is background for training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mstkd.errors import InputError

REGIONS: tuple[str, ...] = ("ET", "TC", "WT")
"""Canonical region order of every target, metric and evaluation table."""

CLASSES: tuple[str, ...] = ("NETC", "ED", "ET", "BG")
"""Output channels of the network: necrotic/non-enhancing core, edema, enhancing tumour, background."""

CLASS_REGIONS: dict[str, tuple[str, ...]] = {"ET": ("ET",), "TC": ("NETC", "ET"), "WT": ("NETC", "ED", "ET")}
"""Which classes make up each region."""


@dataclass(frozen=True)
class LabelConvention:
    """Which label values make up each region, and which values may appear at all."""

    name: str
    necrosis: int
    edema: int
    enhancing: int
    allowed: frozenset[int]

    @property
    def region_labels(self) -> dict[str, tuple[int, ...]]:
        """Region name -> label values that belong to it."""
        return {
            "ET": (self.enhancing,),
            "TC": (self.necrosis, self.enhancing),
            "WT": (self.necrosis, self.edema, self.enhancing),
        }


CONVENTIONS: dict[str, LabelConvention] = {
    "fets": LabelConvention("fets", necrosis=1, edema=2, enhancing=4, allowed=frozenset({0, 1, 2, 4})),
    "brats2023": LabelConvention("brats2023", necrosis=1, edema=2, enhancing=3, allowed=frozenset({0, 1, 2, 3, 4})),
}


def get_convention(name: str) -> LabelConvention:
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise ValueError(f"unknown label convention {name!r}; expected one of {', '.join(CONVENTIONS)}") from None


SHOWN_LABELS = 10
"""How many refused label values an error names, beside their count: a map can hold millions of distinct values."""


def invalid_labels(seg: np.ndarray, convention: LabelConvention) -> np.ndarray:
    """Label values in ``seg`` that the convention does not allow (sorted, in ``seg``'s type); empty when valid."""
    values = np.unique(seg)
    return values[~np.isin(values, sorted(convention.allowed))]


def label_map(data: np.ndarray, where: object) -> np.ndarray:
    """``data`` as an integer label map: uint8 when every value lies in 0..255 (every convention's labels do), which
    keeps :func:`invalid_labels` and the region lookups cheap; else as it is, for :func:`check_labels` to name them.

    Raises:
        InputError: a value that is not an integer; ``where`` (the file) begins its one line.
    """
    if data.dtype.kind not in "biu":
        fractional = data != np.floor(data)
        if fractional.any():
            example = float(data[fractional].flat[0])
            raise InputError(
                f"{where}: {int(np.count_nonzero(fractional))} voxels hold non-integer label values "
                f"(e.g. {example:g}); expected an integer label map"
            )
    if data.size and float(data.min()) >= 0 and float(data.max()) <= 255:
        return data.astype(np.uint8, copy=False)
    return data


def check_labels(seg: np.ndarray, convention: LabelConvention, where: object) -> None:
    """Refuse a label map holding values the convention does not allow, in one line beginning with ``where``: the
    first :data:`SHOWN_LABELS` of them and, when there are more, their count.

    Raises:
        InputError: such values.
    """
    bad = invalid_labels(seg, convention)
    if bad.size:
        shown = ", ".join(f"{v:.12g}" for v in bad[:SHOWN_LABELS].tolist())
        if bad.size > SHOWN_LABELS:
            shown += f", ... ({bad.size} values)"
        allowed = ", ".join(str(v) for v in sorted(convention.allowed))
        raise InputError(
            f"{where}: label values {shown} are not allowed in the {convention.name} convention (allowed: {allowed})"
        )


def regions_from_labels(seg: np.ndarray, convention: LabelConvention) -> np.ndarray:
    """``H x W x D`` integer label map -> ``3 x H x W x D`` boolean ET, TC, WT masks."""
    return np.stack([np.isin(seg, labels) for labels in convention.region_labels.values()])


def labels_from_regions(regions: np.ndarray, convention: LabelConvention) -> np.ndarray:
    """``3 x H x W x D`` boolean ET, TC, WT masks -> ``H x W x D`` uint8 label map.

    Nested reconstruction, as the FeTS and BraTS pipelines do it: a voxel is enhancing
    if ET, otherwise necrosis if TC, otherwise edema if WT. Inconsistent masks (ET
    outside TC) are therefore resolved in favour of the smaller region.
    """
    et, tc, wt = (np.asarray(r, dtype=bool) for r in regions)
    out = np.zeros(et.shape, dtype=np.uint8)
    out[wt] = convention.edema
    out[tc] = convention.necrosis
    out[et] = convention.enhancing
    return out


def classes_from_regions(regions):
    """``3 x ...`` boolean ET, TC, WT -> ``4 x ...`` one-hot NETC, ED, ET, BG (mutually exclusive).

    ET = ET, NETC = TC without ET, ED = WT without TC, BG = outside WT; masks that are not nested
    (ET outside TC) are read as the label map they came from would be (ET wins, then TC). NumPy
    arrays and torch tensors alike (channels first; for a batch see :func:`mstkd.losses.class_targets`).
    """
    et, tc, wt = (r > 0 for r in regions[:3])
    tc = tc | et
    wt = wt | tc
    return _stack([tc & ~et, wt & ~tc, et, ~wt])


def regions_from_classes(classes):
    """``4 x ...`` boolean NETC, ED, ET(, BG) masks -> ``3 x ...`` nested ET, TC, WT (the BG channel is unused).

    The class masks may overlap (independent thresholds); each region is the union of its classes.
    NumPy arrays and torch tensors alike.
    """
    netc, ed, et = (c > 0 for c in classes[:3])
    tc = netc | et
    return _stack([et, tc, tc | ed])


def _stack(masks):
    if isinstance(masks[0], np.ndarray):
        return np.stack(masks)
    import torch

    return torch.stack(masks)
