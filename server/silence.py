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

Nodes sit out only while at least ``keep`` (``min-replies``) connected nodes are left to ask; otherwise every node
is asked. The schedule is not part of the server's state: a resumed run asks every node again.
"""

from __future__ import annotations

from collections.abc import Iterable


class SilentNodes:
    """Which nodes sit a round out, from which were silent before (see the module doc)."""

    def __init__(self, most_rounds: int) -> None:
        self.most_rounds = most_rounds
        self.strikes: dict[int, int] = {}  # node -> silent stages since it last answered
        self.until: dict[int, int] = {}  # node -> the last round it sits out

    def resting(self, server_round: int, connected: Iterable[int], keep: int) -> set[int]:
        """The connected nodes that sit ``server_round`` out: none where fewer than ``keep`` others would be left."""
        connected = set(connected)
        rest = {node for node in connected if self.until.get(node, 0) >= server_round}
        return rest if len(connected - rest) >= max(keep, 1) else set()

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
    """``grid`` as a strategy sees it when it draws the nodes of a stage: without the nodes in ``left_out``. Flower's
    strategies read only ``get_node_ids`` of it; everything else is the grid's."""

    def __init__(self, grid, left_out: set[int]) -> None:
        self.grid, self.left_out = grid, left_out

    def get_node_ids(self) -> list[int]:
        return [node for node in self.grid.get_node_ids() if node not in self.left_out]

    def __getattr__(self, name: str):
        return getattr(self.grid, name)
