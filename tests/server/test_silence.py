"""Which nodes sit a round out after staying silent (server/silence.py)."""

from __future__ import annotations

from server.silence import NodesAsked, SilentNodes


def _rest_rounds(silence: SilentNodes, node: int, rounds: range, connected=(1, 2, 3)) -> list[int]:
    """The rounds ``node`` sits out when it is silent whenever it is asked."""
    sat_out = []
    for r in rounds:
        if node in silence.resting(r, connected, keep=1):
            sat_out.append(r)
        else:
            silence.heard(r, connected, {node})
    return sat_out


def test_a_node_silent_whenever_asked_sits_out_1_2_4_rounds_then_at_most_rest_silent():
    # asked in 1 (rests 2), 3 (rests 4-5), 6 (rests 7-10), 11 (rests 12-15 at most 4), 16 (17-20), 21
    assert _rest_rounds(SilentNodes(4), 3, range(1, 22)) == [2, 4, 5, 7, 8, 9, 10, 12, 13, 14, 15, 17, 18, 19, 20]
    assert _rest_rounds(SilentNodes(0), 3, range(1, 10)) == []  # rest-silent 0: asked every round


def test_an_answer_ends_a_nodes_rest_count_and_other_nodes_are_not_touched():
    silence = SilentNodes(8)
    for r in (1, 3):
        silence.heard(r, [1, 2], {2})
    assert silence.resting(5, [1, 2], keep=1) == {2}  # 2 rounds after its second silence
    silence.heard(6, [1, 2], set())  # it answers
    assert silence.resting(7, [1, 2], keep=1) == set()
    silence.heard(7, [1, 2], {2})  # silent again: one round, as the first time
    assert silence.resting(8, [1, 2], keep=1) == {2} and silence.resting(9, [1, 2], keep=1) == set()


def test_nodes_sit_out_only_while_min_replies_others_are_left_to_ask():
    silence = SilentNodes(4)
    silence.heard(1, [1, 2, 3], {2, 3})
    assert silence.resting(2, [1, 2, 3], keep=1) == {2, 3}
    assert silence.resting(2, [1, 2, 3], keep=2) == set()  # min-replies 2: one node left is too few, all are asked
    assert silence.resting(2, [2, 3], keep=1) == set()  # node 1 disconnected: nobody would be left


class _Grid:
    def get_node_ids(self):
        return [1, 2, 3]

    run = "the grid's own"


def test_the_grid_a_strategy_draws_from_lacks_the_nodes_left_out_and_is_otherwise_the_grid():
    asked = NodesAsked(_Grid(), {2})
    assert asked.get_node_ids() == [1, 3] and asked.run == "the grid's own"
