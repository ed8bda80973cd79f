"""A site's own terms for what leaves it, from its node config, which no run submitter can change.

``require-secagg`` N > 0: the site's update leaves it only masked, under SecAgg+ among at least max(N, 2) nodes.
Without it, a run config with ``secagg=true`` (what a site approves in a plan, ``deploy/plans.py``) sets the same
terms with N = 2 (a site that wants a floor on a round's size sets ``require-secagg``). Before, such a run refused only
a train message outside the protocol, so a set-up whose threshold was 1 of 3 and an unmasking request that names a
node both alive and dead (both of its secrets, so its update) reached Flower's client.
With ``secagg-peers`` too, only in a round whose every node's keys a key of that list signed, each node's by its own,
for this round's set-up, masked only with partners that signed the key list this node was given, and unmasked only
among nodes that signed that they trained on the instructions this node trained on, and only with alive the
survivors this node signed, which at least the round's threshold of its nodes signed too (:mod:`messages.signed_keys`).
:func:`required_secagg` (a ClientApp mod, outside Flower's SecAgg+ client) refuses, before any work:

- any message but ``train``, ``evaluate`` and ``query`` (Flower routes ``train.<name>`` to the same function);
- a train message outside the protocol (a run without ``secagg``, or a coordinator that turned it off);
- a set-up whose threshold t is not more than half of its shares, whose shares are fewer than N, or whose masks
  are not drawn from 2^32 values (Flower's; with Flower's own generator, 2 values make every mask 0);
- a key exchange whose node list is not n >= N distinct node ids in canonical form, this node's among them, or
  whose n is 2t or more (two lists of survivors each signed by t nodes must share a signer);
- a collection of masked vectors whose partners (``srcs``, the nodes whose masks this node adds) are so few that
  the nodes' unmasking answers could rebuild all their keys: each of the n nodes answers once, naming at least t
  nodes alive, so at most n (n - t) key shares are given out for nodes named dead, and t are needed per
  partner; the partners must number more than n (n - t) / t (with none dropped, n - 1 partners, this is
  t > n^2 / (2n - 1), which Flower's two-thirds threshold meets for every n >= 3);
- a list of survivors (the nodes said to have sent masked updates, for the consistency round) fewer than the
  threshold, or naming a node twice or one not in the exchange;
- an unmasking request that names a node both alive and dead, this node dead, or a node not in the exchange.

These close the ways a coordinator that crafts messages was found to recover a node's update from Flower's
SecAgg+ client (which checks none of them), provided every site runs them: the unmasking checks protect the other
sites' keys. The bound on partners assumes that every node of the round has this node's set-up and key list.
Without ``secagg-peers`` nothing makes it so, nor authenticates the nodes of a round to each other: the server
relays their keys, so it can add nodes of its own, put its keys in place of a node's, or give nodes different
thresholds, key lists or fit instructions; and since each node sees only its own unmasking request, a coordinator
that names different nodes dead to different nodes can unmask a sum over as few as two of a round's nodes. With it,
each of those is refused (:mod:`messages.signed_keys`), provided every site of the round checks and fewer than 2t - n
of its n nodes sign for the coordinator. A round replayed over another group of nodes within a run gets no second
update from any node (:mod:`client.sent`); a node seeds each training afresh
(:data:`client.context.SECAGG_SEED`), so no two of its updates are the same; and Flower's 32-bit mask seeds are
replaced (:mod:`messages.masks`).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.context import message_kind
from client.secagg import ROUND
from messages import signed_keys
from mstkd.errors import RefusedMessage
from mstkd.numbers import is_whole
from mstkd.runconfig import NodeConfig, RunConfig

STATE = "mstkd.secagg-terms"
"""Where a node keeps, between a round's stages, the threshold of its set-up and the nodes of its key exchange."""
MOD_RANGE = 2**32
ANSWERED = (MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY)


def required_secagg(msg: Message, context: Context, call_next) -> Message:
    """A ClientApp mod: the site's ``require-secagg`` terms, or a ``secagg=true`` run's (see the module doc).

    Raises:
        RefusedMessage: which term the message breaks, in one line; the others' round goes on without this site.
    """
    node = NodeConfig.parse(context.node_config)
    needed = node.require_secagg
    if needed:
        needed = max(needed, 2)
        terms = (
            f"this site sends its update only under secure aggregation among {needed} nodes or more (require-secagg)"
        )
    elif node.secagg_peers:  # the site believes its keys are checked: say so rather than run unchecked
        raise RefusedMessage("this site's secagg-peers checks SecAgg+ keys only with require-secagg, which is 0")
    elif RunConfig.parse(context.run_config).secagg:  # what a site approves in a plan: the protocol's terms hold too
        needed, terms = 2, "this run's secagg=true sends this site's update only under secure aggregation"
    else:
        return call_next(msg, context)
    if msg.metadata.message_type not in ANSWERED:
        raise RefusedMessage(f"{terms}; it answers train, evaluate and query messages only")
    if message_kind(msg) != MessageType.TRAIN:
        return call_next(msg, context)
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None:
        raise RefusedMessage(f"{terms}; this run asked for it in the clear")
    stage = configs.get(Key.STAGE)
    if stage == Stage.SETUP:
        context.state.config_records.pop(STATE, None)  # a new round: nothing of the last one holds
        broken, kept = _setup(configs, needed)
    elif stage == Stage.SHARE_KEYS:
        broken, kept = _share_keys(configs, context, needed)
        if not broken and node.secagg_peers:
            broken = _signed(configs, node, context, kept)
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        broken, kept = _collect(configs, context), None
        if not broken and node.secagg_peers:
            broken = _partners_signed(configs, context)
    elif stage == signed_keys.SURVIVORS:
        broken, kept = _survivors(configs, context), None
    else:
        broken, kept = _unmask(configs, context), None
        if not broken and node.secagg_peers:
            broken = _alive_trained_alike(configs, context) or _survivors_signed(configs, context)
    if broken:
        raise RefusedMessage(f"{terms}; {broken}")
    # what the terms remember of a stage holds only once Flower's SecAgg+ client has taken it: a stage it refuses
    # (a set-up it cannot read, a second key exchange) leaves the terms without a round, so later stages are refused
    try:
        reply = call_next(msg, context)
    except BaseException:
        context.state.config_records.pop(STATE, None)
        raise
    if reply.has_error():
        context.state.config_records.pop(STATE, None)
    elif kept is not None:
        context.state[STATE] = kept
    return reply


def _shown(value) -> str:
    """A value from the message in a reason: a whole number as itself, anything else not at all."""
    return str(int(value)) if is_whole(value) else "?"


def _setup(configs: ConfigRecord, needed: int) -> tuple[str | None, ConfigRecord | None]:
    shares, threshold = configs.get(Key.SHARE_NUMBER), configs.get(Key.THRESHOLD)
    if not (is_whole(shares) and is_whole(threshold) and 2 * threshold > shares >= needed):
        shown = f"{_shown(threshold)} of {_shown(shares)}"
        return f"this round's threshold ({shown}) is not over half of {needed} or more shares", None
    if configs.get(Key.MOD_RANGE) != MOD_RANGE or not is_whole(configs.get(Key.MOD_RANGE)):
        return "this round's masks would not be drawn from 2^32 values", None
    return None, ConfigRecord({"threshold": int(threshold)})


def _share_keys(configs: ConfigRecord, context: Context, needed: int) -> tuple[str | None, ConfigRecord | None]:
    names = [k for k in configs if k != Key.STAGE and not k.startswith(signed_keys.SIGNED_BY)]
    if not all(name.isascii() and name.isdigit() and _node_id(name) for name in names):
        return "this round's key exchange names a node that is not a node id", None
    if str(context.node_id) not in names:
        return "this round's key exchange leaves this node out", None
    if len(names) < needed:
        return f"this round has {len(names)}", None
    record = context.state.config_records.get(STATE)
    if record is None or "nodes" in record:
        return "this round's key exchange did not follow its set-up", None
    if len(names) >= 2 * record["threshold"]:  # two lists of survivors, each signed by t of the nodes, share a signer
        return f"this round's {len(names)} nodes are not fewer than twice its threshold", None
    return None, ConfigRecord({"threshold": int(record["threshold"]), "nodes": sorted(names)})


def _node_id(name: str) -> bool:
    """A node id as Flower writes one: canonical digits of a 64-bit number."""
    return str(int(name)) == name and int(name) <= signed_keys.MAX_NODE_ID


def _signed(configs: ConfigRecord, node: NodeConfig, context: Context, kept: ConfigRecord) -> str | None:
    """Why the key exchange's keys are not each signed by a key of the site's ``secagg-peers`` for this round (its
    terms as this node signed them), if they are not; else the signers go into ``kept``, for the later checks."""
    if not node.secagg_key:
        return "this site's secagg-peers needs its own secagg-key, to sign its keys as the others check theirs"
    keys = signed_keys.exchange_keys(configs)
    signatures = {n: configs.get(signed_keys.entry(n)) for n in keys}
    peers = signed_keys.read_peers(node.secagg_peers)
    if signed_keys.public_of(signed_keys.load_signing_key(node.secagg_key)) not in peers:
        return "this site's own secagg-key is not in its secagg-peers"
    signed = context.state.config_records.get(ROUND, {})  # what this node keeps to sign (client.secagg)
    if "terms" not in signed:
        return "this round's key exchange did not follow a set-up this node signed"
    try:
        signers = signed_keys.verified_signers(keys, signatures, peers, context.run_id, signed["terms"])
    except ValueError as exc:
        return f"this round's key exchange {exc}"
    kept["signers"] = [signers[int(name)] for name in kept["nodes"]]
    return None


def _checked(context: Context, *needed: str) -> tuple[dict[int, bytes], ConfigRecord] | None:
    """The key that signed each node's round keys, as this site's check found them, and what this node keeps of the
    round to sign (:data:`client.secagg.ROUND`); None if the check did not run or the node keeps ``needed`` not."""
    record, mine = context.state.config_records[STATE], context.state.config_records.get(ROUND)
    if "signers" not in record or mine is None or not all(key in mine for key in needed):
        return None
    return dict(zip((int(n) for n in record["nodes"]), record["signers"], strict=True)), mine


def _partners_signed(configs: ConfigRecord, context: Context) -> str | None:
    """Why some partner did not sign the key list this node was given, if one did not."""
    checked = _checked(context, "terms", "list")
    if checked is None:
        return "this round's key exchange was not checked against secagg-peers"
    (signers, mine), partners = checked, [int(p) for p in configs[Key.SOURCE_LIST]]
    signatures = {p: configs.get(signed_keys.entry(p, signed_keys.LIST_SIGNED_BY)) for p in partners}
    domain = signed_keys.LIST_DOMAIN
    unsigned = signed_keys.unsigned(partners, signatures, signers, domain, context.run_id, mine["terms"], mine["list"])
    if not unsigned:
        return None
    return f"this round pairs this node with node {unsigned[0]}, which did not sign the key list this node was given"


def _alive_trained_alike(configs: ConfigRecord, context: Context) -> str | None:
    """Why some node named alive did not sign that it trained on the fit instructions this node trained on, if one
    did not: a coordinator that gave the others instructions that leave their models as sent (an epoch past the
    schedule's end trains at learning rate 0) would read this node's update off the sum."""
    checked = _checked(context, "terms", "list", "fit")
    if checked is None:
        return "this round's unmasking came before this node's checked masked update"
    (signers, mine), me = checked, context.node_id
    alive = [int(n) for n in configs[Key.ACTIVE_NODE_ID_LIST] if int(n) != me]
    signatures = {n: configs.get(signed_keys.entry(n, signed_keys.FIT_SIGNED_BY)) for n in alive}
    domain, digests = signed_keys.FIT_DOMAIN, (mine["list"], mine["fit"])
    unsigned = signed_keys.unsigned(alive, signatures, signers, domain, context.run_id, mine["terms"], *digests)
    if not unsigned:
        return None
    return f"this round names node {unsigned[0]} alive, which did not train on the instructions this node trained on"


def _survivors_signed(configs: ConfigRecord, context: Context) -> str | None:
    """Why the unmasking request names alive a node not among the survivors this node signed, or dead one among them,
    or lacks signatures of that
    list from at least the round's threshold of its nodes, if it does not (the consistency round,
    :data:`messages.signed_keys.SURVIVORS`): a coordinator that named a node alive to some nodes and dead to others
    would gather both its secrets."""
    checked = _checked(context, "terms", "list", "survivors")
    if checked is None:
        return "this round's unmasking came before this node signed who sent masked updates"
    (signers, mine), (threshold, _) = checked, _round(context)
    survivors, alive = set(mine["survivors"]), set(configs[Key.ACTIVE_NODE_ID_LIST])
    if alive != survivors & (alive | set(configs[Key.DEAD_NODE_ID_LIST])):
        return "this round's unmasking names alive other nodes than the survivors this node signed"
    others = sorted(survivors - {context.node_id})  # this node signed that list itself
    signatures = {n: configs.get(signed_keys.entry(n, signed_keys.SURVIVORS_SIGNED_BY)) for n in others}
    digests = mine["list"], signed_keys.nodes_digest(mine["survivors"])
    domain, terms = signed_keys.SURVIVORS_DOMAIN, mine["terms"]
    unsigned = signed_keys.unsigned(others, signatures, signers, domain, context.run_id, terms, *digests)
    signed = 1 + len(others) - len(unsigned)
    if signed >= threshold:
        return None
    return f"only {signed} of this round's nodes signed the survivors this node signed, not the threshold {threshold}"


def _round(context: Context) -> tuple[int, set[int]] | None:
    """The threshold and the nodes of the round under way, or None before its key exchange."""
    record = context.state.config_records.get(STATE)
    if record is None or "nodes" not in record:
        return None
    return int(record["threshold"]), {int(n) for n in record["nodes"]}


def _ids(value: object) -> bool:
    """A message's list of node ids: whole numbers (whether they are the round's nodes is each check's own)."""
    return isinstance(value, list) and all(is_whole(n) for n in value)


def _collect(configs: ConfigRecord, context: Context) -> str | None:
    known = _round(context)
    if known is None:
        return "this round's masked vectors were asked for before its key exchange"
    threshold, nodes = known
    partners = configs.get(Key.SOURCE_LIST)
    if not _ids(partners):
        return "this round names its partners not as node ids"
    partners = set(partners)
    n = len(nodes)
    if not partners <= nodes - {context.node_id} or len(partners) * threshold <= n * (n - threshold):
        return f"this node would be masked with {len(partners)} of the round's {n - 1} other nodes"
    return None


def _survivors(configs: ConfigRecord, context: Context) -> str | None:
    known = _round(context)
    if known is None:
        return "this round's survivors were asked for before its key exchange"
    threshold, nodes = known
    survivors = configs.get(Key.ACTIVE_NODE_ID_LIST)
    if not _ids(survivors):
        return "this round names its survivors not as node ids"
    if len(set(survivors)) != len(survivors) or not set(survivors) <= nodes or len(survivors) < threshold:
        return f"this round lists {len(survivors)} survivors: fewer than its threshold, or a node twice or not in it"
    return None


def _unmask(configs: ConfigRecord, context: Context) -> str | None:
    known = _round(context)
    if known is None:
        return "this round's unmasking came before its key exchange"
    threshold, nodes = known
    alive, dead = configs.get(Key.ACTIVE_NODE_ID_LIST), configs.get(Key.DEAD_NODE_ID_LIST)
    if not (_ids(alive) and _ids(dead)):
        return "this round's unmasking names its nodes not as node ids"
    named = list(alive) + list(dead)
    if len(set(named)) != len(named) or not set(named) <= nodes:
        return "this round's unmasking names a node twice, or one not in the round"
    if context.node_id in dead or len(alive) < threshold:
        return "this round's unmasking names this node dead, or fewer nodes alive than the threshold"
    return None
