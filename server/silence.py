"""Nodes that stay silent sit rounds out, so that a hung or overloaded site costs the run its timeout once, not in
every stage of every round.

Without this, a node that never answers makes each round wait ``round-timeout`` seconds for its training reply and
again for its validation reply; a site that is merely slow falls further behind each round, as new messages queue
behind the ones it has not finished. With ``rest-silent`` n (the default 4; 0: never):

- a node silent in a round's training is not asked to validate that round's model (it is still at work on the
  training, or gone);
- a node silent in a stage sits out the next round; silent again when it comes back, the next 2 rounds, then 4,
  doubling, at most n in a row;
- any reply (a result, its own error, or one the server refuses) shows it is listening, and it is asked as before.

Nodes sit out only while the round can go on as it would with them: at least ``min-nodes`` connected nodes are
left (the number every strategy's settings were checked against at start: Bulyan's 4f + 3, Krum's 2f + 3,
``update-bound``'s three), and ``fraction-train`` of them is at least ``min-replies``; otherwise every node is asked.
The schedule is not part of the server's state: a resumed run asks every node again.
"""

from __future__ import annotations

from collections.abc import Iterable

from mstkd.runconfig import RunConfig


class SilentNodes:
    """Which nodes sit a round out, from which were silent before (see the module doc)."""

    def __init__(self, most_rounds: int, *, min_nodes: int = 1, min_replies: int = 1, fraction: float = 1.0) -> None:
        self.most_rounds = most_rounds
        self.min_nodes, self.min_replies, self.fraction = min_nodes, min_replies, fraction
        self.strikes: dict[int, int] = {}  # node -> silent stages since it last answered
        self.until: dict[int, int] = {}  # node -> the last round it sits out

    @classmethod
    def for_run(cls, run: RunConfig) -> SilentNodes:
        return cls(run.rest_silent, min_nodes=run.min_nodes, min_replies=run.min_replies, fraction=run.fraction_train)

    def resting(self, server_round: int, connected: Iterable[int]) -> set[int]:
        """The connected nodes that sit ``server_round`` out: none where the others are too few for the round (see
        the module doc)."""
        connected = set(connected)
        rest = {node for node in connected if self.until.get(node, 0) >= server_round}
        left = len(connected - rest)
        return rest if left >= self.min_nodes and max(int(left * self.fraction), 1) >= self.min_replies else set()

    def heard(self, server_round: int, asked: Iterable[int], silent: set[int]) -> None:
        """After a stage of ``server_round``: the ``asked`` nodes in ``silent`` sit out the next 1, 2, 4, ... rounds
        (at most ``most_rounds``); the others answered, and start again from none."""
        for node in asked:
            if node not in silent:
                self.strikes.pop(node, None)
                self.until.pop(node, None)
            elif self.most_rounds:
                strikes = self.strikes[node] = self.strikes.get(node, 0) + 1
                self.until[node] = server_round + min(2 ** min(strikes - 1, 30), self.most_rounds)


class NodesAsked:
    """``grid`` as a strategy sees it when it draws the nodes of a stage: the nodes connected when it is made, without
    those in ``left_out``. A list taken once, so that it cannot shrink between Flower's two reads of it (a draw from
    a list that shrank, or an empty one, waits without limit in Flower's ``sample_nodes``); everything else is the
    grid's."""

    def __init__(self, grid, left_out: set[int]) -> None:
        self.grid = grid
        self.nodes = [node for node in grid.get_node_ids() if node not in left_out]

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def __getattr__(self, name: str):
        return getattr(self.grid, name)
