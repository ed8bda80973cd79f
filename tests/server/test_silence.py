"""Which nodes sit a round out after staying silent (server/silence.py)."""

from __future__ import annotations

from server.silence import NodesAsked, SilentNodes


def _rest_rounds(silence: SilentNodes, node: int, rounds: range, connected=(1, 2, 3)) -> list[int]:
    """The rounds ``node`` sits out when it is silent whenever it is asked."""
    sat_out = []
    for r in rounds:
        if node in silence.resting(r, connected):
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
    assert silence.resting(
        5,
        [1, 2],
    ) == {2}  # 2 rounds after its second silence
    silence.heard(6, [1, 2], set())  # it answers
    assert (
        silence.resting(
            7,
            [1, 2],
        )
        == set()
    )
    silence.heard(7, [1, 2], {2})  # silent again: one round, as the first time
    assert (
        silence.resting(
            8,
            [1, 2],
        )
        == {2}
        and silence.resting(
            9,
            [1, 2],
        )
        == set()
    )


def test_nodes_sit_out_only_while_the_others_are_enough_for_the_round():
    def resting(connected, **settings) -> set[int]:
        silence = SilentNodes(4, **settings)
        silence.heard(1, [1, 2, 3, 4], {3, 4})
        return silence.resting(2, connected)

    assert resting([1, 2, 3, 4]) == {3, 4}
    assert resting([2, 3, 4]) == {3, 4}  # node 1 disconnected: node 2 is left
    assert resting([3, 4]) == set()  # nobody would be left: all are asked
    # min-nodes 3 (Bulyan's, Krum's and update-bound's settings were checked against it): two left are too few
    assert resting([1, 2, 3, 4], min_nodes=3) == set()
    assert resting([1, 2, 3, 4], min_replies=2) == {3, 4}
    # fraction-train 0.5 draws one of the two left, fewer than min-replies 2: all are asked, and two drawn
    assert resting([1, 2, 3, 4], min_replies=2, fraction=0.5) == set()


def test_for_run_takes_the_run_configs_rest_silent_min_nodes_min_replies_and_fraction_train():
    from mstkd.runconfig import RunConfig

    run = RunConfig.parse({"rest-silent": 2, "min-nodes": 3, "min-replies": 2, "fraction-train": 0.5})
    silence = SilentNodes.for_run(run)
    assert (silence.most_rounds, silence.min_nodes, silence.min_replies, silence.fraction) == (2, 3, 2, 0.5)


class _Grid:
    def __init__(self) -> None:
        self.connected = [1, 2, 3]

    def get_node_ids(self):
        return list(self.connected)

    run = "the grid's own"


def test_the_grid_a_strategy_draws_from_is_a_list_taken_once_without_the_nodes_left_out():
    grid = _Grid()
    asked = NodesAsked(grid, {2})
    grid.connected = [1]  # a node leaves while Flower reads the list twice: the draw must not see it shrink
    assert asked.get_node_ids() == [1, 3] and asked.run == "the grid's own"
    assert NodesAsked(asked, {3}).get_node_ids() == [1]  # a view of a view
