"""SecAgg+ masks (messages.masks): every bit of a seed counts, node and server draw alike, and a coordinator that
declares a node lost after taking its masked update is left with a mask it cannot guess."""

from __future__ import annotations

import hashlib
import io
import os
import types
from importlib import import_module

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flowers_masks
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

import client.secagg  # noqa: F401  (puts the masks in place on the node's side)
import server.secagg  # noqa: F401  (and on the server's)
from messages.masks import masks, use_full_seeds
from mstkd.errors import InputError, RefusedMessage
from server.app import app as server_app
from tests.helpers import InProcGrid, secagg_stage, server_context

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower's task identity, which making a message needs

FLOWERS_CLIENT = import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
SHAPES = [(1,), (3, 4), ()]
RANGE = 2**32
TARGET = 2**22  # the quantisation's levels, as this project's server sets them


def _folded(seed: bytes) -> int:
    """The 32 bits Flower 1.42's generator keeps of a seed: its 4-byte words XORed together."""
    return int(np.bitwise_xor.reduce(np.frombuffer(seed, dtype="<u4")))


def test_a_mask_depends_on_every_bit_of_its_seed():
    seed = os.urandom(32)
    first = np.concatenate([m.ravel() for m in masks(seed, RANGE, [(64,)])])
    seen = {first.tobytes()}
    for bit in range(256):
        flipped = bytearray(seed)
        flipped[bit // 8] ^= 1 << (bit % 8)
        seen.add(np.concatenate([m.ravel() for m in masks(bytes(flipped), RANGE, [(64,)])]).tobytes())
    assert len(seen) == 257  # each of the 256 one-bit changes gives its own mask
    # why: Flower's generator keeps 32 bits, so two seeds whose words XOR alike draw one mask
    twin = bytearray(seed)
    twin[0] ^= 0xA5
    twin[4] ^= 0xA5
    assert _folded(bytes(twin)) == _folded(seed)
    assert np.array_equal(flowers_masks(seed, RANGE, [(64,)])[0], flowers_masks(bytes(twin), RANGE, [(64,)])[0])
    assert not np.array_equal(masks(seed, RANGE, [(64,)])[0], masks(bytes(twin), RANGE, [(64,)])[0])


def test_masks_are_the_aes_ctr_stream_of_the_seeds_hash_as_the_docstring_defines_it():
    """A known answer, computed here from the definition: one stream of little-endian words across the arrays."""
    seed, shapes = bytes(range(32)), [(3,), (2, 2), (), (5,)]
    for num_range, width in ((2**32, 4), (2**20, 4), (2**40, 8)):
        key = hashlib.sha256(b"mstkd SecAgg+ mask, AES-256-CTR, v1\x00" + seed).digest()
        stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(13 * width))
        words = [int.from_bytes(stream[i : i + width], "little") % num_range for i in range(0, len(stream), width)]
        drawn = np.concatenate([m.ravel() for m in masks(seed, num_range, shapes)])
        assert drawn.tolist() == words, num_range  # every array, the last included, at its offset in the stream


@pytest.mark.parametrize("num_range", [2**32, 2**22, 2**63, 2])
def test_masks_are_flowers_shapes_and_type_and_uniform_over_their_range(num_range):
    seed = b"a pairwise key of 44 bytes, as Flower's..."
    drawn = masks(seed, num_range, SHAPES)
    assert [m.shape for m in drawn] == SHAPES and all(m.dtype == np.int64 for m in drawn)
    assert all(np.array_equal(a, b) for a, b in zip(drawn, masks(seed, num_range, SHAPES), strict=True))
    values = masks(seed, num_range, [(100_000,)])[0]
    assert values.min() >= 0 and values.max() <= num_range - 1
    bins = min(num_range, 10)
    counts = np.bincount((values // (num_range // bins)).astype(np.int64), minlength=bins)  # bins of equal width
    assert counts.min() > 100_000 / bins * 0.94 and counts.max() < 100_000 / bins * 1.06, counts


def test_a_range_or_seed_no_mask_can_be_drawn_from_is_refused():
    for bad in (1, 0, 3 * 2**30, 1000, 2**64, True, 2.0**32, "4294967296"):
        with pytest.raises(ValueError, match="a mask's range must be a power of two in 2..2\\*\\*63"):
            masks(b"k" * 32, bad, SHAPES)
    for bad in (b"short", 32, "text of enough characters"):
        with pytest.raises(ValueError, match="a mask's seed must be at least 16 bytes"):
            masks(bad, RANGE, SHAPES)
    # a node refuses such a range at its set-up, before it trains for a round it could not mask
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    setup = {"sample_num": 3, "share_num": 3, "threshold": 2, "clipping_range": 8.0, "target_range": TARGET}
    message = secagg_stage(Stage.SETUP, node=5, **setup, mod_range=3 * 2**30, max_weight=1.0)
    with pytest.raises(RefusedMessage, match="secure aggregation: a mask's range must be a power of two"):
        client.secagg.secagg_mod(message, context, lambda m, c: pytest.fail("no work for such a round"))


def test_the_node_and_the_server_draw_their_masks_alike_and_from_the_whole_seed(monkeypatch):
    assert FLOWERS_CLIENT.pseudo_rand_gen is masks and server.secagg.flower_secagg.pseudo_rand_gen is masks
    assert client.secagg.FULL_SEEDS and server.secagg.FULL_SEEDS
    assert use_full_seeds(FLOWERS_CLIENT) and FLOWERS_CLIENT.pseudo_rand_gen is masks  # a second time: unchanged
    again = types.ModuleType("flower_module_seen_by_a_second_import")
    again.pseudo_rand_gen = types.FunctionType(masks.__code__, masks.__globals__)  # another copy of this function
    again.pseudo_rand_gen.full_seed = masks.full_seed
    assert use_full_seeds(again) and again.pseudo_rand_gen is not masks  # known, kept
    unknown = types.ModuleType("a_later_flower")
    unknown.pseudo_rand_gen = lambda seed, num_range, shapes: []
    assert not use_full_seeds(unknown) and not use_full_seeds(types.ModuleType("no_generator"))
    # where the masks could not be put in place, neither side takes part in secure aggregation
    monkeypatch.setattr(client.secagg, "FULL_SEEDS", False)
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(RefusedMessage, match="this node's Flower draws masks in a way this version does not know"):
        client.secagg.secagg_mod(secagg_stage(Stage.SETUP, node=5), context, lambda m, c: pytest.fail("no work"))
    monkeypatch.setattr(server.secagg, "FULL_SEEDS", False)
    run_config = {"secagg": True, "min-nodes": 3}
    grid = InProcGrid(lambda message, context: pytest.fail("no node is asked"), run_config, [{}])
    with pytest.raises(InputError, match="this Flower draws SecAgg\\+ masks in a way this version does not know"):
        server_app(grid, server_context(grid, run_config))
    assert grid.sent == []


# --------------------------------------------------------------------------- the attack, through Flower's own client


def _masked_round(updates: dict[int, np.ndarray]) -> tuple:
    """Nodes ``updates`` through Flower's SecAgg+ client (with this process's generator) up to their masked
    vectors, as an honest server drives it: their contexts, public keys, masked vectors, and how to ask a node."""
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in updates}

    def answer(node: int, message: Message, update=None) -> ConfigRecord:
        def fit(msg: Message, ctx: Context) -> Message:  # the node's training: its update, one case
            fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([update]), 1, {})
            return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

        return FLOWERS_CLIENT.secaggplus_mod(message, contexts[node], fit).content[RECORD_KEY_CONFIGS]

    setup = {"sample_num": 3, "share_num": 3, "threshold": 2, "clipping_range": 8.0, "target_range": TARGET}
    setup |= {"mod_range": RANGE, "max_weight": 1.0}
    keys = {n: answer(n, secagg_stage(Stage.SETUP, node=n, **setup)) for n in updates}
    public = {str(n): [k[Key.PUBLIC_KEY_1], k[Key.PUBLIC_KEY_2]] for n, k in keys.items()}
    shared = {n: answer(n, secagg_stage(Stage.SHARE_KEYS, node=n, **public)) for n in updates}
    masked = {}
    for node in updates:
        sent = [
            (src, c)
            for src, s in shared.items()
            for d, c in zip(s[Key.DESTINATION_LIST], s[Key.CIPHERTEXT_LIST], strict=True)
            if d == node
        ]
        message = secagg_stage(
            Stage.COLLECT_MASKED_VECTORS, node=node, srcs=[s for s, _ in sent], ctxts=[c for _, c in sent]
        )
        vectors = answer(node, message, updates[node])[Key.MASKED_PARAMETERS]
        masked[node] = [np.load(io.BytesIO(v), allow_pickle=False) for v in vectors]
    return contexts, public, masked, answer


def _strip_pairwise_masks_of(victim: int, others: list[int], round_) -> tuple[list[np.ndarray], bytes]:
    """A coordinator that has ``victim``'s masked vector and tells the others it was lost: their shares of its
    first key rebuild its pairwise masks, which come off. Left: its quantised update plus its private mask."""
    contexts, public, masked, answer = round_
    shares = []
    for node in others:
        reply = answer(node, secagg_stage(Stage.UNMASK, node=node, active_nids=others, dead_nids=[victim]))
        shares.append(dict(zip(reply[Key.NODE_ID_LIST], reply[Key.SHARE_LIST], strict=True))[victim])
    first_key = bytes_to_private_key(combine_shares(shares))
    left = [v.copy() for v in masked[victim]]
    shapes = [v.shape for v in left]
    for node in others:
        pairwise = FLOWERS_CLIENT.pseudo_rand_gen(
            generate_shared_key(first_key, bytes_to_public_key(public[str(node)][0])), RANGE, shapes
        )
        sign = -1 if victim > node else 1  # the victim added or took away this pair's mask
        left = [(v + sign * p) % RANGE for v, p in zip(left, pairwise, strict=True)]
    own_seed = contexts[victim].state.config_records[RECORD_KEY_STATE]["rd_seed"]  # for the test's eyes only
    return left, own_seed


@pytest.mark.parametrize("generator", ["flower's", "the whole seed's"])
def test_a_coordinator_that_declares_a_masked_node_lost_must_guess_its_private_mask(monkeypatch, generator):
    if generator == "flower's":
        monkeypatch.setattr(FLOWERS_CLIENT, "pseudo_rand_gen", flowers_masks)
    rng = np.random.default_rng(0)
    updates = {n: rng.normal(0, 0.1, 1000).astype(np.float32) for n in (5, 6, 7)}
    left, own_seed = _strip_pairwise_masks_of(5, [6, 7], _masked_round(updates))
    shapes = [v.shape for v in left]

    def unmasked_by(guess: int) -> list[np.ndarray]:
        drawn = flowers_masks(guess.to_bytes(4, "little"), RANGE, shapes)  # the search: 2**32 such masks
        return [(v - m) % RANGE for v, m in zip(left, drawn, strict=True)]

    def plausible(values: list[np.ndarray]) -> bool:  # a quantised update lies in 0..TARGET
        return bool(values[1][:8].max() <= TARGET)

    truth = _folded(own_seed)  # what a search of all 2**32 guesses would reach in time
    candidates = [truth, *np.random.default_rng(1).integers(0, 2**32, 2000).tolist()]
    found = [g for g in candidates if plausible(unmasked_by(g))]
    if generator == "flower's":
        assert found == [truth]  # eight values tell the one right guess from 2000 wrong ones
        update = unmasked_by(truth)[1].astype(np.float64) / TARGET * 16 - 8  # the quantisation undone
        assert np.abs(update - updates[5]).max() < 1e-5  # the node's update, to the quantisation's step
    else:
        assert found == []  # no 32-bit guess comes near: the mask is one of 2**256
