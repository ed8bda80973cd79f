"""The grid a SecAgg+ round runs on (:func:`server.secagg.run_secagg`): it checks each reply for what Flower's workflow
reads before the workflow reads it, and relays the nodes' signatures (:mod:`messages.signed_keys`) from the stage
whose replies carry them to the stage whose requests need them."""

from __future__ import annotations

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Array, Error, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from messages import signed_keys
from messages.arrays import NDARRAY, WireError, decode_array
from mstkd.numbers import is_whole
from server.loop import expire
from server.replies import SiteCases, printable

_KEY, _BYTES, _NODES = "key", "bytes", "nodes"
STAGE_FIELDS = {
    Stage.SETUP: {Key.PUBLIC_KEY_1: _KEY, Key.PUBLIC_KEY_2: _KEY},
    Stage.SHARE_KEYS: {Key.DESTINATION_LIST: _NODES, Key.CIPHERTEXT_LIST: _BYTES},
    Stage.COLLECT_MASKED_VECTORS: {Key.MASKED_PARAMETERS: _BYTES},
    Stage.UNMASK: {Key.NODE_ID_LIST: _NODES, Key.SHARE_LIST: _BYTES},
    signed_keys.SURVIVORS: {},  # the project's consistency round: nothing Flower reads
}
"""What Flower's SecAgg+ workflow reads from each stage's replies: a key (bytes), a list of bytes, or a list of node
ids under each key; the lists of one reply have one length, and a list of node ids names exactly the nodes its message
asked about, each once (its key shares go to each neighbour it was given the keys of; its shares for unmasking are
of each node it was asked for)."""


SIGNED_IN = {
    Stage.SETUP: signed_keys.SIGNED_BY,
    Stage.SHARE_KEYS: signed_keys.LIST_SIGNED_BY,
    Stage.COLLECT_MASKED_VECTORS: signed_keys.FIT_SIGNED_BY,
    signed_keys.SURVIVORS: signed_keys.SURVIVORS_SIGNED_BY,
}
"""The field of each stage's reply that carries the node's signature (:mod:`messages.signed_keys`)."""
RELAYED_IN = {
    Stage.SHARE_KEYS: [signed_keys.SIGNED_BY],
    Stage.COLLECT_MASKED_VECTORS: [signed_keys.LIST_SIGNED_BY],
    Stage.UNMASK: [signed_keys.FIT_SIGNED_BY, signed_keys.SURVIVORS_SIGNED_BY],
}
"""The signatures each stage's requests carry, of the nodes they name."""


class CheckedGrid:
    """A grid whose SecAgg+ replies are checked for what the workflow reads before it reads them (the workflow indexes
    them unchecked, so one malformed reply ended the run with a ``KeyError``): a reply that lacks a field, holds
    another type, names a node outside the round, sends masked vectors of other shapes or a case count out of range
    becomes that node's error, which the protocol treats as a dropped node. So does one whose key shares skip a
    neighbour or whose unmasking shares skip a node asked for: the masks would no longer cancel, or too few shares
    would be left, and the round's sum would be wrong or lost. The contents of keys, ciphertexts and shares cannot be
    checked: with secure aggregation the server cannot tell a wrong one (docs/security.md)."""

    def __init__(
        self,
        grid,
        shapes: list[tuple[int, ...]],
        max_examples: int,
        peers: frozenset[bytes] = frozenset(),
        listing: SiteCases | None = None,
    ) -> None:
        self.grid, self.shapes, self.max_examples = grid, [(1,), *shapes], max_examples  # the weight factor first
        self.peers = peers  # the consortium's node keys (run config secagg-peers): set-up replies must be signed by one
        self.listing = listing  # run config site-cases: a node's count at most its signer's listing
        self.terms = b""  # this round's terms (signed_keys.round_terms), from its set-up
        self.signers: dict[int, bytes] = {}  # with peers: the key that signed each node's round keys, this round
        self.sent: dict[int, tuple[bytes, tuple[bytes, ...]]] = {}  # with peers: what each node's next reply signs
        self.counts: dict[int, int] = {}  # the case count of each node whose masked vectors were taken, this round
        self.signatures: dict[str, dict[int, object]] = {}  # by field (SIGNED_IN): each node's signature, this round
        self.errors: list[str] = []  # the reasons of this round's error replies

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        asked = {m.metadata.dst_node_id: _asked(m) for m in messages}
        for message in messages:
            self._relay_signatures(message, asked[message.metadata.dst_node_id][0])
        expire(messages, timeout)
        replies = [self._checked(reply, asked) for reply in self.grid.send_and_receive(messages, timeout=timeout)]
        for reply in replies:
            if reply.has_error():
                self.errors.append(printable(reply.error.reason, 200))
            else:
                self._keep_signature(reply, asked.get(reply.metadata.src_node_id, ("",))[0])
        return replies

    def _keep_signature(self, reply: Message, stage: str | None) -> None:
        """A node's signature in its reply (:data:`SIGNED_IN`), to relay; one that is not of the form a node signs is
        dropped (the sites that check then refuse that node)."""
        record, field = reply.content.config_records.get(RECORD_KEY_CONFIGS), SIGNED_IN.get(stage)
        if record is not None and field is not None and _signed_form(record.get(field), stage):
            self.signatures.setdefault(field, {})[reply.metadata.src_node_id] = record[field]

    def _relay_signatures(self, message: Message, stage: str | None) -> None:
        """A set-up starts a round with no signature; a key exchange carries each listed node's signature of its keys
        beside them, a request for masked vectors each partner's signature of its key list, and an unmasking request
        each living node's signatures of its fit instructions and of the survivors, for nodes whose sites check them
        (:mod:`messages.signed_keys`)."""
        if stage == Stage.SETUP:
            self.signatures, self.errors, self.signers, self.sent = {}, [], {}, {}
            self.terms = signed_keys.round_terms(message.content[RECORD_KEY_CONFIGS], message.metadata.group_id)
            return
        if self.peers and stage in SIGNED_IN:
            self._expect(message, stage)
        if stage not in RELAYED_IN:
            return
        record = message.content.config_records[RECORD_KEY_CONFIGS]
        nodes = _relayed_for(record, stage)
        for field in RELAYED_IN[stage]:
            signed = self.signatures.get(field, {})
            for node in [n for n in nodes if n in signed]:
                record[signed_keys.entry(node, field)] = signed[node]

    def _checked(self, reply: Message, asked: dict[int, tuple[str | None, list[int]]]) -> Message:
        if reply.has_error():
            return reply
        stage, nodes = asked.get(reply.metadata.src_node_id, ("", []))
        if reply.metadata.src_node_id not in asked:
            problem = "a reply from a node not asked"
        elif stage not in STAGE_FIELDS:  # the workflow's other messages
            return reply
        else:
            try:
                problem = self._problem(reply, stage, nodes)
            except Exception as exc:  # a reply that does not even read
                problem = f"unreadable ({type(exc).__name__})"
        if problem is None:
            return reply
        return Message(metadata=reply.metadata, error=Error(code=0, reason=f"SecAgg+ {stage}: {problem}"))

    def _problem(self, reply: Message, stage: str, nodes: list[int]) -> str | None:
        fields = STAGE_FIELDS[stage]
        record = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        values = {key: record.get(key) if record is not None else None for key in fields}
        for key, kind in fields.items():
            value = values[key]
            if kind == _KEY and not isinstance(value, bytes):
                return f"{key} is not a key"
            if kind != _KEY and not isinstance(value, list):
                return f"{key} is not a list"
            if kind == _BYTES and not all(isinstance(v, bytes) for v in value):
                return f"{key} holds something other than bytes"
            if kind == _NODES and not (all(is_whole(v) for v in value) and sorted(value) == sorted(nodes)):
                return f"{key} does not name each node it was asked about once"
        if len({len(v) for v in values.values() if isinstance(v, list)}) > 1:
            return "its lists differ in length"
        if self.peers and stage == Stage.SETUP:
            return self._unsigned_keys(reply, [values[Key.PUBLIC_KEY_1], values[Key.PUBLIC_KEY_2]])
        if self.peers and stage in SIGNED_IN and (problem := self._unsigned(reply, stage)):
            return problem
        if stage == Stage.COLLECT_MASKED_VECTORS:
            try:  # the header against the bytes that came, before Flower's reader allocates what it claims
                masked = values[Key.MASKED_PARAMETERS]
                vectors = [decode_array(Array(dtype="", shape=(), stype=NDARRAY, data=b), "iu") for b in masked]
            except WireError as exc:
                return f"a masked vector does not read ({exc})"
            if [v.shape for v in vectors] != self.shapes:
                return "its masked vectors are not of the model's shapes"
            examples = compat.recorddict_to_fitres(reply.content, True).num_examples
            if not (is_whole(examples) and 1 <= examples <= self.max_examples):
                return f"a case count outside 1..{self.max_examples}"
            signer = self.signers.get(reply.metadata.src_node_id, b"")
            if self.listing is not None and examples > (most := self.listing.most(signer, "train")):
                return f"a case count of {int(examples)}, above the {most} training cases site-cases gives its key"
            self.counts[reply.metadata.src_node_id] = int(examples)
        return None

    def _unsigned_keys(self, reply: Message, pair: list[bytes]) -> str | None:
        """Why a set-up reply's round keys are not signed by a consortium key (run config ``secagg-peers``) of their
        own, if they are not: every site that checks would refuse the round's key exchange for them, so the node is
        left out of the round here instead."""
        node, signed = reply.metadata.src_node_id, reply.content[RECORD_KEY_CONFIGS].get(signed_keys.SIGNED_BY)
        try:
            signer = signed_keys.signer_of(node, pair, signed, self.peers, reply.metadata.run_id, self.terms)
        except ValueError as exc:
            return f"the reply {exc}"
        if signer in self.signers.values():
            return f"node {node}'s keys are signed by a key that signed another node's"
        if self.listing is not None and signer not in self.listing.cases:
            return f"node {node}'s keys are signed by a key that site-cases does not list"
        self.signers[node] = signer
        return None

    def _expect(self, message: Message, stage: str | None) -> None:
        """What the reply to ``message`` must sign (:func:`messages.signed_keys.sign_statement`), as its node signs it:
        the key list it is sent; the fit instructions it is sent, with that list; the survivors it is sent, with that
        list."""
        node, record = message.metadata.dst_node_id, message.content[RECORD_KEY_CONFIGS]
        if stage == Stage.SHARE_KEYS:
            self.sent[node] = signed_keys.LIST_DOMAIN, (signed_keys.list_digest(signed_keys.exchange_keys(record)),)
        elif stage == Stage.COLLECT_MASKED_VECTORS and node in self.sent:
            listed = self.sent[node][1][0]
            self.sent[node] = signed_keys.FIT_DOMAIN, (listed, signed_keys.fit_digest(message.content))
        elif stage == signed_keys.SURVIVORS and node in self.sent:
            listed, survivors = self.sent[node][1][0], record[Key.ACTIVE_NODE_ID_LIST]
            self.sent[node] = signed_keys.SURVIVORS_DOMAIN, (listed, signed_keys.nodes_digest(survivors))

    def _unsigned(self, reply: Message, stage: str) -> str | None:
        """Why a reply does not carry its node's signature of what it was sent, by the key that signed its round keys,
        if it does not: every site that checks would refuse the next stage for it, so the node is lost here instead
        (after the key exchange, recovered from the others' shares, as any node lost on the way)."""
        node, signed = reply.metadata.src_node_id, reply.content[RECORD_KEY_CONFIGS].get(SIGNED_IN[stage])
        domain, digests = self.sent.get(node, (b"", ()))
        run = reply.metadata.run_id
        if not digests or signed_keys.unsigned([node], {node: signed}, self.signers, domain, run, self.terms, *digests):
            return "the reply does not carry the node's signature of what it was sent"
        return None


def _asked(message: Message) -> tuple[str | None, list[int]]:
    """The SecAgg+ stage a message asks for (None for the workflow's other messages), and the nodes its reply must name:
    the neighbours whose keys it carries (but the node itself) when sharing keys, the nodes whose shares it asks for
    when unmasking."""
    record = message.content.config_records.get(RECORD_KEY_CONFIGS) if message.has_content() else None
    stage = record.get(Key.STAGE) if record is not None else None
    if stage == Stage.SHARE_KEYS:
        nodes = [int(k) for k in record if k.isdigit() and int(k) != message.metadata.dst_node_id]
    elif stage == Stage.UNMASK:
        nodes = [*record[Key.ACTIVE_NODE_ID_LIST], *record[Key.DEAD_NODE_ID_LIST]]
    else:
        nodes = []
    return (stage if isinstance(stage, str) else None), nodes


def _signed_form(value: object, stage: str | None) -> bool:
    """A signature (bytes), or at a set-up [signature, public key]; each of at most ``MAX_FIELD`` bytes."""
    if stage == Stage.SETUP:
        return isinstance(value, list) and len(value) == 2 and all(map(signed_keys.short_bytes, value))
    return signed_keys.short_bytes(value)


def _relayed_for(record, stage: str) -> list[int]:
    """The nodes whose signatures a request carries: a key exchange's listed nodes, a request for masked vectors'
    partners, an unmasking request's nodes named alive."""
    if stage == Stage.SHARE_KEYS:
        return [int(k) for k in record if k.isdigit()]
    if stage == Stage.COLLECT_MASKED_VECTORS:
        return list(record[Key.SOURCE_LIST])
    return list(record[Key.ACTIVE_NODE_ID_LIST])
