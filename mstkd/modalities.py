"""The four MRI modalities, the 15 non-empty subsets of them, and zero-filling.

Canonical channel order everywhere in the project: FLAIR, T1, T1ce, T2 (the order
of the official MST-KDNet code and of the paper's table rows). A subset is named by
joining its members in that order with ``+`` (``flair+t1ce``); the full set is
``flair+t1+t1ce+t2``. :data:`SUBSETS` lists the 15 subsets in the column order of
the paper's Tables 1-4 (single modalities, then pairs, triples, all four), so every
result table lines up with the published ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mstkd.errors import InputError

if TYPE_CHECKING:  # torch is imported where a tensor is made: the config checks use this module without it
    import torch

MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
"""Canonical channel order of every image tensor ``C x H x W x D`` (C = 4)."""

DISPLAY_NAMES: dict[str, str] = {"flair": "FLAIR", "t1": "T1", "t1ce": "T1Gd", "t2": "T2"}
"""Names as printed in the paper's tables (T1Gd = T1ce)."""


@dataclass(frozen=True, order=True)
class Subset:
    """A non-empty set of available modalities, stored as a 4-bit channel mask.

    ``mask[i]`` is True when ``MODALITIES[i]`` is present.
    """

    mask: tuple[bool, bool, bool, bool]

    def __post_init__(self) -> None:
        if len(self.mask) != len(MODALITIES) or not any(self.mask):
            raise ValueError(f"a subset needs a 4-entry mask with at least one modality, got {self.mask}")

    @classmethod
    def of(cls, modalities: Iterable[str]) -> Subset:
        """Subset from modality keys, e.g. ``Subset.of(["t1ce", "flair"])``."""
        names = set(modalities)
        unknown = names - set(MODALITIES)
        if unknown:
            raise InputError(f"unknown modality {sorted(unknown)[0]!r}; expected some of {', '.join(MODALITIES)}")
        if not names:
            raise InputError("a modality subset needs at least one modality")
        return cls(tuple(m in names for m in MODALITIES))  # type: ignore[arg-type]

    @classmethod
    def parse(cls, text: str) -> Subset:
        """Subset from a name such as ``flair+t1ce`` or ``flair,t1ce`` (order-free, case-free)."""
        parts = [p.strip().lower() for p in text.replace(",", "+").split("+") if p.strip()]
        return cls.of(parts)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Member keys in canonical order."""
        return tuple(m for m, on in zip(MODALITIES, self.mask, strict=True) if on)

    @property
    def name(self) -> str:
        """Canonical name, e.g. ``flair+t1ce``."""
        return "+".join(self.modalities)

    @property
    def display_name(self) -> str:
        """Name as in the paper's column headers, e.g. ``FLAIR+T1Gd``; all four is ``All four``."""
        if all(self.mask):
            return "All four"
        return "+".join(DISPLAY_NAMES[m] for m in self.modalities)

    @property
    def bits(self) -> str:
        """The mask as a 4-character string over FLAIR, T1, T1ce, T2, e.g. ``1010``."""
        return "".join("1" if on else "0" for on in self.mask)

    def issubset(self, other: Subset) -> bool:
        return all(o or not s for s, o in zip(self.mask, other.mask, strict=True))

    def __str__(self) -> str:
        return self.name


FULL = Subset((True, True, True, True))

# Paper column order (Tables 1-4), as 4-bit masks over FLAIR, T1, T1ce, T2.
_PAPER_ORDER = (
    "0001", "0010", "0100", "1000",  # T2, T1Gd, T1, FLAIR
    "0011", "0110", "1100", "0101", "1001", "1010",  # pairs
    "1110", "1101", "1011", "0111",  # triples
    "1111",  # all four
)  # fmt: skip
SUBSETS: tuple[Subset, ...] = tuple(Subset(tuple(b == "1" for b in bits)) for bits in _PAPER_ORDER)  # type: ignore[misc]
"""All 15 non-empty subsets in the paper's column order."""


def subsets_within(available: Subset) -> tuple[Subset, ...]:
    """The subsets that can be formed from ``available`` modalities, in paper order."""
    return tuple(s for s in SUBSETS if s.issubset(available))


def parse_subsets(spec) -> tuple[Subset, ...]:
    """``all`` -> the 15 subsets; ``full`` -> all four only; names (a list, or one string split at commas
    and spaces, e.g. ``"flair flair+t1ce"``) -> those subsets, in paper order."""
    if spec in (None, "all"):
        return SUBSETS
    if spec == "full":
        return (FULL,)
    names = spec.replace(",", " ").split() if isinstance(spec, str) else list(spec)
    chosen = {FULL if n == "full" else Subset.parse(n) for n in names}
    return tuple(s for s in SUBSETS if s in chosen)


def channel_mask(
    subset: Subset, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """``C`` tensor of 0/1 weights, 1 for present modalities (float32 unless ``dtype``)."""
    import torch

    return torch.tensor(subset.mask, dtype=dtype or torch.float32, device=device)


def zero_fill(image: torch.Tensor | np.ndarray, subset: Subset) -> torch.Tensor | np.ndarray:
    """Zero the channels of absent modalities.

    Args:
        image: ``C x H x W x D`` or ``B x C x H x W x D`` with C = 4 in canonical order.
        subset: the modalities kept.

    Returns:
        A new array/tensor of the same shape and type with absent channels set to 0.
    """
    channel_axis = image.ndim - 4
    if image.shape[channel_axis] != len(MODALITIES):
        raise ValueError(f"expected {len(MODALITIES)} channels on axis {channel_axis}, got shape {tuple(image.shape)}")
    shape = [1] * image.ndim
    shape[channel_axis] = len(MODALITIES)
    if isinstance(image, np.ndarray):
        return image * np.asarray(subset.mask, dtype=image.dtype).reshape(shape)
    return image * channel_mask(subset, dtype=image.dtype, device=image.device).view(shape)


def sample_subset(
    rng: np.random.Generator, subsets: Sequence[Subset] = SUBSETS, weights: Sequence[float] | None = None
) -> Subset:
    """Draw one subset, uniformly (the paper's modality dropout) or with ``weights``."""
    if weights is None:
        return subsets[int(rng.integers(len(subsets)))]
    p = np.asarray(weights, dtype=float)
    if len(p) != len(subsets) or (p < 0).any() or p.sum() <= 0:
        raise InputError("subset weights must be non-negative, one per subset, and not all zero")
    return subsets[int(rng.choice(len(subsets), p=p / p.sum()))]
