"""`fsbridge check --connect`: does FreeSWITCH let us in, does PlanFix answer?

After the config checks, ``check_freeswitch`` opens the Event Socket at
``[freeswitch] host:port``, waits for FreeSWITCH's greeting, logs in with
``password`` and asks ``api status``, then says ``exit``; then ``fsbridge
ping`` asks PlanFix (with ``[planfix]`` or the stored setup) and compares
what PlanFix holds with ``public_url`` / ``token``.  The FreeSWITCH check returns
``(ok, lines)``: what works, or what failed with what to check
(``run`` prints both and gives the exit code).  Nothing
is changed anywhere.
"""

from __future__ import annotations

import socket
from typing import Callable

from fsbridge.core.wire import FrameParser, ProtocolError

Result = tuple[bool, list[str]]


def _read_frame(sock: socket.socket, parser: FrameParser, pending: list) -> object:
    while not pending:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("FreeSWITCH closed the connection")
        pending.extend(parser.feed(data))
    return pending.pop(0)


def check_freeswitch(host: str, port: int, password: str, timeout: float, config_path: str) -> Result:
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return False, [f"FreeSWITCH {where}: cannot connect: {exc.strerror or exc}",
                       f"  is FreeSWITCH running and mod_event_socket loaded? see [freeswitch] host/port in {config_path}"]
    parser, pending = FrameParser(), []
    try:
        with sock:
            greeting = _read_frame(sock, parser, pending)
            if greeting.content_type != "auth/request":
                return False, [f"FreeSWITCH {where}: no ESL greeting (got {greeting.content_type!r}); "
                               "is this port FreeSWITCH's Event Socket?"]
            sock.sendall(f"auth {password}\n\n".encode("utf-8"))
            reply = _read_frame(sock, parser, pending)
            text = reply.headers.get("Reply-Text", "")
            if not text.startswith("+OK"):
                return False, [f"FreeSWITCH {where}: refused the password ({text or reply.content_type})",
                               f"  compare event_socket.conf.xml with [freeswitch] password in {config_path}"]
            sock.sendall(b"api status\n\n")
            status = _read_frame(sock, parser, pending)
            first = status.body.decode("utf-8", "replace").strip().splitlines()[:1]
            sock.sendall(b"exit\n\n")
    except (OSError, ConnectionError, ProtocolError, ValueError) as exc:
        return False, [f"FreeSWITCH {where}: {exc}"]
    return True, [f"FreeSWITCH {where}: logged in; {first[0] if first else 'api status answered'}"]


def run(cfg, ping_planfix: Callable[[object], int]) -> int:
    """Both checks, printed; 0 when every FreeSWITCH node and PlanFix work, else 1.

    ``ping_planfix(cfg)`` is ``fsbridge ping`` (prints what PlanFix holds for
    each tenant, returns its exit code).
    """
    ok = True
    for node in cfg.nodes:
        fs = node.section
        where = "[freeswitch]" if node.implicit else f"[freeswitch.{node.name}]"
        node_ok, lines = check_freeswitch(fs.host, fs.port, fs.password, fs.connect_timeout,
                                          f"{where} of {cfg.path}" if not node.implicit else cfg.path)
        print("\n".join(lines))
        ok = ok and node_ok
    print("PlanFix:")
    planfix_ok = ping_planfix(cfg) == 0
    print(f"FreeSWITCH {'works' if ok else 'FAILS'}; PlanFix {'works' if planfix_ok else 'FAILS'}")
    return 0 if ok and planfix_ok else 1
