"""The package layout holds the design: the pure core imports no I/O edge.

fsbridge/core/ is events in, PlanFix commands out.  If one of its modules
imported a socket, SQLite, HTTP or gevent module (or an fsbridge module
beside the core, which all do I/O), the core could no longer be tested
without them; this checks it in a fresh interpreter.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import fsbridge.core

# Modules that do I/O, or schedule it, that the core must not pull in.
IO_MODULES = ("gevent", "greenswitch", "flask", "werkzeug", "sqlite3", "requests",
              "geventhttpclient", "prometheus_client", "socket", "subprocess")


def test_every_core_module_imports_only_the_core_and_no_io_module():
    names = [f"fsbridge.core.{info.name}" for info in pkgutil.iter_modules(fsbridge.core.__path__)]
    assert {"fsbridge.core.tracker", "fsbridge.core.wire", "fsbridge.core.events"} <= set(names)
    probe = (
        "import importlib, json, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    loaded = json.loads(out.stdout)
    edges = [m for m in loaded if m.startswith("fsbridge.") and not m.startswith("fsbridge.core")]
    assert edges == []
    assert [m for m in loaded if m.split(".")[0] in IO_MODULES] == []
