"""fsbridge.gaps: when a node was out of sight, and which calls lie wholly in that time."""

from __future__ import annotations

from fsbridge.gaps import KEEP_S, Gaps


def test_first_connect_opens_no_gap_and_calls_before_it_are_not_in_one(tmp_path):
    gaps = Gaps(str(tmp_path / "g.sqlite3"))
    assert gaps.connected("", 100.0) is None
    assert not gaps.in_gap("", 50.0, 60.0, connected_now=True, now=100.0)  # before fsbridge ever ran


def test_a_reconnect_closes_the_gap_since_the_node_was_last_seen(tmp_path):
    gaps = Gaps(str(tmp_path / "g.sqlite3"))
    gaps.connected("", 100.0)
    gaps.alive("", 110.0)
    assert gaps.connected("", 130.0) == (110.0, 130.0)
    assert gaps.in_gap("", 111.0, 129.0, connected_now=True, now=140.0)
    assert not gaps.in_gap("", 109.0, 120.0, connected_now=True, now=140.0)  # began while seen
    assert not gaps.in_gap("", 120.0, 131.0, connected_now=True, now=140.0)  # still up at the connect: adopted
    assert not gaps.in_gap("n2", 111.0, 129.0, connected_now=True, now=140.0)  # another node's gap


def test_while_still_out_of_sight_the_open_gap_counts_up_to_now(tmp_path):
    """A restarted process gets CDRs before its Event Socket is up."""
    path = str(tmp_path / "g.sqlite3")
    gaps = Gaps(path)
    gaps.connected("", 100.0)
    gaps.alive("", 110.0)
    gaps.close()
    again = Gaps(path)  # the next process
    assert again.in_gap("", 112.0, 118.0, connected_now=False, now=120.0)
    assert not again.in_gap("", 112.0, 118.0, connected_now=True, now=120.0)
    assert not again.in_gap("", 108.0, 118.0, connected_now=False, now=120.0)


def test_reported_calls_are_remembered_then_pruned(tmp_path):
    gaps = Gaps(str(tmp_path / "g.sqlite3"))
    gaps.mark_reported("call-1", 100.0)
    assert gaps.reported("call-1") and not gaps.reported("call-2")
    gaps.connected("", 100.0 + KEEP_S + 1)
    assert not gaps.reported("call-1")


def test_held_cdrs_stay_until_their_call_is_reported_or_released(tmp_path):
    path = str(tmp_path / "g.sqlite3")
    gaps = Gaps(path)
    gaps.hold("n1", "call-1", "call-1", '{"a":1}', 10.0)
    gaps.hold("n1", "call-1", "leg-1", '{"b":1}', 11.0)
    gaps.hold("n1", "call-2", "call-2", '{"c":1}', 12.0)
    gaps.hold("n2", "call-3", "call-3", '{"d":1}', 9.0)
    gaps.hold("n1", "call-1", "leg-1", '{"b":2}', 13.0)  # posted again: replaced, not doubled
    gaps.close()
    gaps = Gaps(path)  # what a restarted process finds
    assert gaps.held("n1") == [('{"a":1}', 10.0), ('{"c":1}', 12.0), ('{"b":2}', 13.0)]
    gaps.mark_reported("call-1", 20.0)
    assert gaps.held("n1") == [('{"c":1}', 12.0)]
    gaps.release("call-2")
    assert gaps.held("n1") == [] and gaps.held("n2") == [('{"d":1}', 9.0)]
    gaps.connected("n2", 9.0 + KEEP_S + 1)
    assert gaps.held("n2") == []
