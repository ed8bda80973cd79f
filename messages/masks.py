"""SecAgg+ masks that depend on every bit of their seed.

Flower 1.42's SecAgg+ expands each mask from a seed with ``pseudo_rand_gen``, on the node (``secaggplus_mod``) and on
the server (``SecAggPlusWorkflow``). It folds the seed into 32 bits by XOR and draws from NumPy's Mersenne Twister,
so a node's private mask, drawn from 32 random bytes, is one of only 2**32 masks. SecAgg+ relies on that mask when a
node is declared lost: the others then hand the server the node's pairwise key, so that its pairwise masks can be
taken out of the sum. A coordinator that has the node's masked update and declares it lost anyway (no node can tell)
is left with the update plus the private mask alone, and can try every one of the 2**32 seeds: the right one leaves
values in the quantisation's range, and a handful of values tell it apart. Re-seeding one NumPy generator takes
about 6 microseconds, so that is some 7 hours on one core, and less on many: no protection.

:func:`masks` draws masks of the same form (int64 arrays of the shapes asked, uniform over 0..``num_range`` - 1,
where Flower's stop at ``num_range`` - 2, one stream across the arrays) from AES-256 in counter mode, keyed by
SHA-256 of the whole seed, read as little-endian words. :func:`use_full_seeds` puts it in place of Flower's in one of
Flower's two modules. Node and server must draw alike: the ClientApp (:mod:`client.secagg`) and the ServerApp
(:mod:`server.secagg`) each put it in place when they are imported, so the two halves of one app bundle agree; where
it cannot be put in place (a Flower that draws otherwise), each refuses secure aggregation instead of masking with
Flower's. A node of another version leaves the round's unmasked sum of weight factors wrong, so that round is skipped
(:mod:`server.secagg`).
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
MIN_SEED = 16
"""The fewest bytes a seed may have (Flower's are 32 random bytes, or a 44-byte pairwise key)."""


def check_range(num_range: object) -> int:
    """``num_range`` as an int, if it is a power of two in 2..2**63 (Flower's server sends 2**32).

    Raises:
        ValueError: any other value.
    """
    whole = isinstance(num_range, int | np.integer) and not isinstance(num_range, bool)
    if not whole or not 2 <= int(num_range) <= 2**63 or int(num_range) & (int(num_range) - 1):
        raise ValueError(f"a mask's range must be a power of two in 2..2**63, not {num_range!r}")
    return int(num_range)


def masks(seed: bytes, num_range: int, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """One int64 array per shape, uniform over 0..``num_range`` - 1: the AES-256-CTR stream keyed by
    SHA-256(:data:`DOMAIN` + ``seed``), read as little-endian words (4 bytes each for a range up to 2**32, 8 above),
    one after another across the arrays. The same seed always gives the same arrays, on any machine.

    Raises:
        ValueError: ``seed`` is not bytes of at least :data:`MIN_SEED`, or ``num_range`` fails :func:`check_range`.
    """
    if not isinstance(seed, bytes) or len(seed) < MIN_SEED:
        raise ValueError(f"a mask's seed must be at least {MIN_SEED} bytes")
    num_range = check_range(num_range)
    stream = Cipher(algorithms.AES(hashlib.sha256(DOMAIN + seed).digest()), modes.CTR(bytes(16))).encryptor()
    word = np.dtype("<u4" if num_range <= 2**32 else "<u8")
    drawn = []
    for shape in shapes:
        values = np.frombuffer(stream.update(bytes(math.prod(shape) * word.itemsize)), dtype=word).astype(np.int64)
        if num_range != 2**32:
            values &= num_range - 1  # a power of two: the low bits of a uniform word are uniform
        drawn.append(values.reshape(shape))
    return drawn


masks.full_seed = DOMAIN  # how use_full_seeds knows this function, even from a second import of this module


def use_full_seeds(module: ModuleType) -> bool:
    """Make Flower's SecAgg+ ``module`` (its client mod's or its server workflow's) draw masks with :func:`masks`.
    False where it draws with neither Flower 1.42's function nor this one (a Flower this version does not know): the
    caller then refuses secure aggregation rather than mask with a generator it does not know."""
    drawing = getattr(module, "pseudo_rand_gen", None)
    if getattr(drawing, "full_seed", None) == DOMAIN:
        return True
    if drawing is not flowers_masks:
        return False
    module.pseudo_rand_gen = masks
    return True
