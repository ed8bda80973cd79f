"""SecAgg+ masks that depend on every bit of their seed.

Flower 1.42's SecAgg+ expands each mask from a seed with ``pseudo_rand_gen``, on the node (``secaggplus_mod``) and on
the server (``SecAggPlusWorkflow``). It folds the seed into 32 bits by XOR and draws from NumPy's Mersenne Twister,
so a node's private mask, drawn from 32 random bytes, is one of only 2**32 masks. SecAgg+ relies on that mask when a
node is declared lost: the others then hand the server the node's pairwise key, so that its pairwise masks can be
taken out of the sum. A coordinator that has the node's masked update and declares it lost anyway (no node can tell)
is left with the update plus the private mask alone, and can try every one of the 2**32 seeds: the right one leaves
values in the quantisation's range, and a handful of values tell it apart. That is 2**32 generator starts, about
100 microseconds each in NumPy and far less in compiled code: a task of hours, not a protection.

:func:`masks` draws the masks Flower's function draws (int64 arrays of the shapes asked, uniform over
0..``num_range`` - 1, one stream across the arrays) from AES-256 in counter mode, keyed by SHA-256 of the whole seed.
:func:`use_full_seeds` puts it in place of Flower's in one of Flower's two modules. Node and server must draw alike:
the ClientApp (:mod:`client.secagg`) and the ServerApp (:mod:`server.secagg`) each put it in place when they are
imported, so the two halves of one app bundle agree. A node of another version leaves the round's unmasked sum of
weight factors wrong, so that round is skipped (:mod:`server.secagg`).
"""

from __future__ import annotations

import hashlib
import math
from types import ModuleType

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flowers_masks

DOMAIN = b"mstkd SecAgg+ mask, AES-256-CTR, v1\x00"
"""Prefixed to a seed before it is hashed into a key, so that no other use of the same seed gives the same stream."""


def masks(seed: bytes, num_range: int, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """One int64 array per shape, uniform over 0..``num_range`` - 1, from the AES-256-CTR stream keyed by
    SHA-256(:data:`DOMAIN` + ``seed``). The same seed always gives the same arrays, on any machine.

    Raises:
        ValueError: ``num_range`` is not a whole number in 2..2**62.
    """
    if isinstance(num_range, bool) or not isinstance(num_range, int | np.integer) or not 2 <= num_range <= 2**62:
        raise ValueError(f"a mask's range must be a whole number in 2..2**62, not {num_range!r}")
    num_range = int(num_range)
    stream = Cipher(algorithms.AES(hashlib.sha256(DOMAIN + bytes(seed)).digest()), modes.CTR(bytes(16))).encryptor()
    power_of_two = num_range & (num_range - 1) == 0
    word = np.dtype(np.uint32 if power_of_two and num_range <= 2**32 else np.uint64)
    drawn = []
    for shape in shapes:
        count = math.prod(shape)
        raw = np.frombuffer(stream.update(bytes(count * word.itemsize)), dtype=word)
        if power_of_two:
            values = (raw & word.type(num_range - 1)).astype(np.int64)
        else:  # from 64 bits: the remainder's bias is at most num_range / 2**64
            values = (raw % word.type(num_range)).astype(np.int64)
        drawn.append(values.reshape(shape))
    return drawn


def use_full_seeds(module: ModuleType) -> None:
    """Make Flower's SecAgg+ ``module`` (its client mod's or its server workflow's) draw masks with :func:`masks`.

    Raises:
        RuntimeError: ``module`` draws with neither Flower's function nor this one (a Flower this version does not
            know): refused rather than left masking with 32-bit seeds.
    """
    drawing = getattr(module, "pseudo_rand_gen", None)
    if drawing is masks:
        return
    if drawing is not flowers_masks:
        raise RuntimeError(f"{module.__name__} does not draw its SecAgg+ masks with Flower 1.42's pseudo_rand_gen")
    module.pseudo_rand_gen = masks
