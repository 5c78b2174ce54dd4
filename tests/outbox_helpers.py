"""Commands and order checks shared by the outbox tests and the outbox_worker script."""

from __future__ import annotations

import collections
from dataclasses import dataclass


@dataclass(frozen=True)
class Cmd:
    """Shaped like tracker.PlanfixCommand: what Outbox.put takes."""

    call_id: str
    fields: dict[str, str]


def call_commands(call_id: str, count: int, first_seq: int = 0) -> list[Cmd]:
    """`count` valid events of one call (INCOMING, ACCEPTED..., COMPLETED), numbered in `diversion`."""
    assert count >= 1
    cmds = []
    for i in range(count):
        seq = first_seq + i
        fields = {"cmd": "event", "type": "in", "phone": "79101234567", "ext": "101", "callid": call_id, "diversion": str(seq)}
        if i == 0:
            fields["event"] = "INCOMING"
        elif i == count - 1:
            fields.update(event="COMPLETED", duration=str(seq), is_recorded="0", status="Success")
        else:
            fields["event"] = "ACCEPTED"
        cmds.append(Cmd(call_id, fields))
    return cmds


def many_calls(calls: int, per_call: int, prefix: str = "call") -> list[Cmd]:
    """Commands of `calls` calls interleaved the way a busy PBX produces them."""
    per = [call_commands(f"{prefix}-{c:04d}", per_call) for c in range(calls)]
    return [per[c][i] for i in range(per_call) for c in range(calls)]


def key(form: dict[str, str]) -> tuple[str, int]:
    return form["callid"], int(form["diversion"])


def assert_each_once_in_call_order(forms: list[dict[str, str]], expected: list[Cmd]) -> None:
    """Every expected command arrived exactly once, and each call's in its order."""
    got = [key(f) for f in forms]
    dupes = [k for k, n in collections.Counter(got).items() if n > 1]
    assert not dupes, f"sent twice: {dupes[:10]}"
    want = {key(c.fields) for c in expected}
    assert set(got) == want, f"missing {sorted(want - set(got))[:10]}, unexpected {sorted(set(got) - want)[:10]}"
    by_call: dict[str, list[int]] = collections.defaultdict(list)
    for call_id, seq in got:
        by_call[call_id].append(seq)
    for call_id, seqs in by_call.items():
        assert seqs == sorted(seqs), f"call {call_id} out of order: {seqs}"
