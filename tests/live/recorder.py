"""Record a live call as a capture of tests/data/esl: the raw ESL bytes of `event plain ALL`.

The format of tests/data/esl/README.md: a raw socket (no ESL library) that
sends `auth`, `event plain ALL` and, at the end, `exit`; every byte received,
from the `auth/request` greeting to the `text/disconnect-notice`, goes
unmodified to `<name>.plain.txt`, the bytes sent to `<name>.plain.sent.txt`.
Used by the live tests when FSBRIDGE_LIVE_CAPTURE names a directory.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

CAPTURE_DIR_ENV = "FSBRIDGE_LIVE_CAPTURE"


class EslRecorder:
    def __init__(self, port: int, password: str, path: Path) -> None:
        self.path = Path(path)
        self._sent = bytearray()
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._sock.settimeout(None)  # a bridged call may send nothing for many seconds
        self._out = open(self.path, "wb")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._send(f"auth {password}\n\n".encode())
        self._send(b"event plain ALL\n\n")
        self._wait_for(b"Reply-Text: +OK event listener enabled plain")

    def _send(self, data: bytes) -> None:
        self._sent += data
        self._sock.sendall(data)

    def _read(self) -> None:
        while True:
            try:
                chunk = self._sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            self._out.write(chunk)
            self._out.flush()

    def _wait_for(self, marker: bytes, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.path.read_bytes()[:4096]:
                return
            time.sleep(0.05)
        raise RuntimeError(f"ESL recorder: no {marker!r} from FreeSWITCH")

    def close(self) -> None:
        try:
            self._send(b"exit\n\n")
        except OSError:
            pass
        self._reader.join(15)  # FreeSWITCH answers +OK bye and closes
        self._sock.close()
        self._out.close()
        self.path.with_name(self.path.name.replace(".plain.txt", ".plain.sent.txt")).write_bytes(bytes(self._sent))


@contextlib.contextmanager
def recording(port: int, password: str, name: str, settle: float = 1.0) -> Iterator[None]:
    """Record `name` while the block runs, when FSBRIDGE_LIVE_CAPTURE is set; else nothing.

    `settle`: seconds to keep recording after the block, so the last
    CHANNEL_DESTROY of the call is in the file.
    """
    directory = os.environ.get(CAPTURE_DIR_ENV)
    if not directory:
        yield
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    recorder = EslRecorder(port, password, Path(directory) / f"{name}.plain.txt")
    try:
        yield
        time.sleep(settle)
    finally:
        recorder.close()
