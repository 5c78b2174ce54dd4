"""The open-calls registry: in each tenant's outbox database, written in the
same transaction as the requests, read back by the next process; an older
fsbridge's open-calls.sqlite3 moved in at start."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest

from fsbridge import config
from fsbridge.accounts import account_dir
from fsbridge.opencalls import LEGACY_FILENAME, OpenCalls, OpenCallsError, migrate_legacy
from fsbridge.outbox import Outbox, OutboxError, db_path_for
from fsbridge.service import Service
from fsbridge.core.tracker import PlanfixCommand

START = {"cmd": "event", "type": "in", "event": "INCOMING", "phone": "7", "diversion": "", "ext": "101",
         "callid": "a"}


def start(call_id: str, ext: str = "101", **tags) -> PlanfixCommand:
    return PlanfixCommand(call_id, dict(START, callid=call_id, ext=ext), **tags)


def event(call_id: str, name: str, ext: str = "101", **tags) -> PlanfixCommand:
    return PlanfixCommand(call_id, dict(START, callid=call_id, ext=ext, event=name), **tags)


@pytest.fixture
def boxes():
    opened: list[Outbox] = []

    def open_box(path) -> Outbox:
        box = Outbox(str(path), client=None)  # never started: nothing is sent
        opened.append(box)
        return box

    yield open_box
    for box in opened:
        box.stop(drain_timeout=0)


def test_open_legs_live_in_the_outbox_and_the_next_process_closes_them(tmp_path, boxes):
    path = tmp_path / "outbox.sqlite3"
    box = boxes(path)
    box.put([start("a"), start("a", ext="102"), PlanfixCommand("b", dict(START, callid="b", type="out",
                                                                        event="OUTGOING")),
             event("a", "ACCEPTED")])
    box.put([event("a", "COMPLETED", ext="102")])
    box.stop()
    again = OpenCalls([boxes(path)])
    assert set(again.inherited) == {"a", "b"}
    assert again.close_inherited({"a"}) == [
        ("b", {"cmd": "event", "type": "out", "phone": "7", "diversion": "", "ext": "101", "callid": "b",
               "event": "COMPLETED", "duration": "0", "is_recorded": "0", "status": "NoAnswer"})]
    closed = again.close_inherited(set())
    assert [(c, f["ext"], f["status"]) for c, f in closed] == [("a", "101", "Success")]
    assert again.inherited == {}


def test_a_put_that_fails_stores_neither_the_requests_nor_the_call_starts(tmp_path, boxes):
    path = tmp_path / "outbox.sqlite3"
    box = boxes(path)
    db = sqlite3.connect(path)
    db.execute("CREATE TRIGGER no_legs BEFORE INSERT ON open_legs BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    db.commit()
    db.close()
    with pytest.raises(OutboxError, match="disk full"):
        box.put([start("a")])
    assert box.list_entries() == [] and box.open_legs() == [] and box.depth() == 0


def test_one_commit_holds_a_batch_of_requests_and_their_legs(tmp_path, boxes):
    box = boxes(tmp_path / "outbox.sqlite3")
    statements: list[str] = []
    box._conn.set_trace_callback(statements.append)
    box.put([start("a"), event("a", "ACCEPTED"), start("b"), event("b", "COMPLETED")])
    assert [s for s in statements if s in ("BEGIN IMMEDIATE", "COMMIT")] == ["BEGIN IMMEDIATE", "COMMIT"]
    assert [(row[0], row[2]) for row in box.open_legs()] == [("a", 1)]  # b began and ended in the batch


def test_open_calls_wait_for_the_cdr_then_close_blind(tmp_path, boxes):
    path = tmp_path / "outbox.sqlite3"
    boxes(path).put([start("a"), start("b", ext="102")])
    reg = OpenCalls([boxes(path)])
    assert set(reg.inherited) == {"a", "b"}
    assert reg.close_inherited(set(), now=100.0, wait=30) == []
    assert reg.pop_inherited("a") == [(dict(START, callid="a"), False)]  # its CDR came
    assert reg.close_inherited(set(), now=129.0, wait=30) == []
    closed = reg.close_inherited(set(), now=130.0, wait=30)
    assert [(c, f["status"], f["duration"]) for c, f in closed] == [("b", "Missed", "0")]


def test_lost_calls_are_taken_back_from_whichever_tenant_holds_them(tmp_path, boxes):
    acme, beta = boxes(tmp_path / "acme.sqlite3"), boxes(tmp_path / "beta.sqlite3")
    reg = OpenCalls([acme, beta])
    acme.put([start("a", tenant="acme"), event("a", "ACCEPTED", tenant="acme")])
    beta.put([start("b", tenant="beta", node="n2")])
    assert reg.inherited == {}  # followed live by this process
    reg.take_back(["a", "b", "unknown"])
    assert reg.inherited == {"a": [(dict(START, callid="a"), True)], "b": [(dict(START, callid="b"), False)]}
    assert reg.owner("a") == ("", "acme") and reg.owner("b") == ("n2", "beta")


def test_a_source_read_again_adds_no_second_copy_of_a_call_still_inherited(tmp_path, boxes):
    path = tmp_path / "outbox.sqlite3"
    boxes(path).put([start("a"), start("a", ext="102")])
    box = boxes(path)
    reg = OpenCalls([box])
    reg.remove_source(box)  # its tenant removed by a reload ...
    reg.add_source(box)  # ... and added back while the call is still to be closed
    assert [fields["ext"] for fields, _ in reg.inherited["a"]] == ["101", "102"]


def test_an_outbox_of_the_first_schema_gains_the_registry_and_keeps_its_requests(tmp_path, boxes):
    path = tmp_path / "outbox.sqlite3"
    boxes(path).put([event("a", "ACCEPTED")])  # not a start: no leg
    db = sqlite3.connect(path)
    db.execute("DROP TABLE open_legs")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    box = boxes(path)
    assert [e.call_id for e in box.list_entries()] == ["a"] and box.open_legs() == []
    box.put([start("b")])
    assert [row[0] for row in box.open_legs()] == ["b"]


# -- an older fsbridge's open-calls.sqlite3 --------------------------------------


def legacy_registry(directory, rows, with_tenants: bool = True) -> str:
    path = os.path.join(directory, LEGACY_FILENAME)
    db = sqlite3.connect(path)
    extra = ", tenant TEXT NOT NULL DEFAULT '', node TEXT NOT NULL DEFAULT ''" if with_tenants else ""
    db.execute("CREATE TABLE open_legs (call_id TEXT NOT NULL, ext TEXT NOT NULL, fields TEXT NOT NULL,"
               f" accepted INTEGER NOT NULL DEFAULT 0{extra}, PRIMARY KEY (call_id, ext))")
    marks = ", ".join("?" * (6 if with_tenants else 4))
    db.executemany(f"INSERT INTO open_legs VALUES ({marks})", rows)
    db.commit()
    db.close()
    return path


def leg(call_id, ext="101", accepted=0, *tags):
    return (call_id, ext, json.dumps(dict(START, callid=call_id, ext=ext)), accepted, *tags)


def test_the_legacy_registry_is_moved_into_each_tenants_outbox_then_removed(tmp_path):
    cfg = config.load(_ini(tmp_path, TWO_TENANTS))
    os.makedirs(cfg.storage.dir, exist_ok=True)
    path = legacy_registry(cfg.storage.dir, [leg("a1", "101", 1, "acme", "n1"), leg("b1", "201", 0, "beta", ""),
                                             leg("gone", "101", 0, "removed-tenant", ""),
                                             leg("old", "101", 0, "", "")])
    service = Service(cfg)
    try:
        assert not os.path.exists(path)
        assert [row[0] for row in service.accounts["acme"].outbox.open_legs()] == ["a1"]
        assert [row[0] for row in service.accounts["beta"].outbox.open_legs()] == ["b1"]
        # A tenant no longer configured, and a call from before tenants in a cloud-PBX
        # config, have no PlanFix to tell: an older fsbridge closed them sending nothing.
        assert set(service.open_calls.inherited) == {"a1", "b1"}
        assert service.open_calls.owner("a1") == ("n1", "acme")
        assert service.open_calls.inherited["a1"] == [(dict(START, callid="a1"), True)]
    finally:
        _stop(service)


def test_a_registry_from_before_tenants_goes_to_the_one_tenant(tmp_path):
    cfg = config.load(_ini(tmp_path, f"[server]\ntoken = {'t' * 32}\n"))
    os.makedirs(cfg.storage.dir, exist_ok=True)
    legacy_registry(cfg.storage.dir, [leg("old")], with_tenants=False)
    service = Service(cfg)
    try:
        assert set(service.open_calls.inherited) == {"old"} and service.open_calls.owner("old") == ("", "")
        assert [row[0] for row in service.accounts[cfg.tenants[0].name].outbox.open_legs()] == ["old"]
    finally:
        _stop(service)


def test_a_move_cut_short_finishes_at_the_next_start_without_doubles(tmp_path, boxes):
    path = legacy_registry(tmp_path, [leg("a1", "101", 0, "acme", ""), leg("b1", "201", 0, "beta", "")])
    acme, beta = boxes(tmp_path / "acme.sqlite3"), boxes(tmp_path / "beta.sqlite3")

    def failing(tenant):
        if tenant == "beta":
            raise sqlite3.OperationalError("disk I/O error")
        return acme

    with pytest.raises(OpenCallsError, match="disk I/O error"):
        migrate_legacy(str(tmp_path), failing)
    assert os.path.exists(path)  # nothing lost: moved again next time
    assert migrate_legacy(str(tmp_path), {"acme": acme, "beta": beta}.get) == 2
    assert [row[0] for row in acme.open_legs()] == ["a1"] and [row[0] for row in beta.open_legs()] == ["b1"]
    assert not os.path.exists(path) and migrate_legacy(str(tmp_path), {}.get) == 0


def test_a_tenant_added_by_a_reload_inherits_what_an_earlier_process_left_open(tmp_path, boxes):
    only_acme = TWO_TENANTS[:TWO_TENANTS.index("[tenant.beta]")]
    cfg = config.load(_ini(tmp_path, only_acme))
    both = config.load(_ini(tmp_path, TWO_TENANTS))
    beta_dir = account_dir(cfg.storage.dir, both.tenant("beta"))
    os.makedirs(beta_dir)
    box = boxes(db_path_for(beta_dir))
    box.put([start("b1", ext="201", tenant="beta", node="n1")])
    box.stop()
    service = Service(cfg)
    try:
        assert service.open_calls.inherited == {}
        service.apply_tenants(both)
        assert set(service.open_calls.inherited) == {"b1"} and service.open_calls.owner("b1") == ("n1", "beta")
    finally:
        _stop(service)


TWO_TENANTS = f"""
[tenant.acme]
token = {"a" * 32}
domains = acme.pbx.example
[tenant.beta]
token = {"b" * 32}
domains = beta.pbx.example
"""


def _ini(tmp_path, text: str) -> str:
    path = tmp_path / "f.ini"
    path.write_text(f"[storage]\ndir = {tmp_path / 'state'}\n" + text)
    return str(path)


def _stop(service: Service) -> None:
    for account in [*service.accounts.values(), *service._retiring.values()]:
        account.stop(drain_timeout=0)
    service.recordings.close()
