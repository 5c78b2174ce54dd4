"""Run the real fsbridge service as a child process, for end-to-end tests.

The service under test is exactly what `fsbridge run -c FILE` starts: its own
process, its own gevent hub, real sockets to the fake FreeSWITCH and the fake
PlanFix.  Tests talk to it over HTTP and can stop it gently (SIGTERM) or
brutally (SIGKILL) to check what survives.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import requests
import urllib3

from tests.conftest import REPO

TOKEN = "e2e-pbx-token-0123456789abcdef"


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """(certfile, keyfile) for 127.0.0.1, made with openssl, valid one day."""
    if not shutil.which("openssl"):
        raise AssertionError("openssl (Debian package openssl) is needed to make a test certificate")
    cert, key = Path(directory) / "cert.pem", Path(directory) / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unverified(method, url: str, **kwargs) -> requests.Response:
    """A request to the test service, whose TLS certificate (when it has one)
    is self-signed for the test: not verified, and urllib3 not warning so."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
        return method(url, verify=False, **kwargs)


class PortTaken(RuntimeError):
    """The service could not listen: another process took one of its ports."""


class ServiceProcess:
    """One fsbridge process with a config written for the test."""

    def __init__(
        self,
        workdir: Path,
        *,
        fs_port: int = 0,
        planfix_url: str = "",
        planfix_token: str = "",
        settings: dict[str, dict[str, str]] | None = None,
        tenants: dict[str, dict[str, str]] | None = None,
        nodes: dict[str, int] | None = None,
    ) -> None:
        """``tenants`` (name -> keys of its ``[tenant.NAME]``) makes a cloud PBX:
        ``[server] token`` is then left empty (each tenant has its own).
        ``nodes`` (name -> port) writes one ``[freeswitch.NAME]`` per fake
        FreeSWITCH; ``[freeswitch]`` then only gives their defaults."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.dialplan_port = free_port()
        self.metrics_port = free_port()
        # With tenants there is no service-wide PBX key: each tenant's is its own.
        self.token = "" if tenants else TOKEN
        self.storage = self.workdir / "state"
        self.config_path = self.workdir / "fsbridge.ini"
        self.log_path = self.workdir / "service.log"
        sections: dict[str, dict[str, str]] = {
            "freeswitch": {
                "host": "127.0.0.1",
                "port": str(fs_port),
                "password": "ClueCon",
                "connect_timeout": "1",
                "command_timeout": "2",
                "max_backoff": "0.5",
            },
            "server": {
                "listen": f"127.0.0.1:{self.port}",
                "token": self.token,
                "public_url": f"http://127.0.0.1:{self.port}",
            },
            "planfix": {
                "url": planfix_url,
                "token": planfix_token,
                "allow_http": "yes",
                "connect_timeout": "1",
                "read_timeout": "2",
            },
            "outbox": {"min_backoff": "0.05", "max_backoff": "0.5"},
            "storage": {"dir": str(self.storage)},
            "dialplan": {"listen": f"127.0.0.1:{self.dialplan_port}"},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
            "log": {"level": "DEBUG"},
        }
        if nodes:
            del sections["freeswitch"]["port"]  # each node names its own
        for name, port in (nodes or {}).items():
            sections[f"freeswitch.{name}"] = {"host": "127.0.0.1", "port": str(port)}
        for section, values in (settings or {}).items():
            sections.setdefault(section, {}).update(values)
        # HTTPS when the test gives a certificate (self-signed: not verified)
        self.scheme = "https" if sections["server"].get("certfile") else "http"
        sections["server"]["public_url"] = f"{self.scheme}://127.0.0.1:{self.port}"
        self.sections = sections
        self._tenants = tenants
        self.write_config(sections, tenants)
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._started = False

    def write_config(self, sections: dict[str, dict[str, str]],
                     tenants: dict[str, dict[str, str]] | None = None) -> None:
        """Write the config file; ``tenants`` become ``[tenant.NAME]`` sections."""
        everything = dict(sections)
        everything.update({f"tenant.{name}": values for name, values in (tenants or {}).items()})
        lines = []
        for section, values in everything.items():
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {value}" for key, value in values.items())
            lines.append("")
        self.config_path.write_text("\n".join(lines))

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def dialplan_url(self) -> str:
        return f"http://127.0.0.1:{self.dialplan_port}"

    def start(self, wait: float = 20.0) -> "ServiceProcess":
        for attempt in range(3):
            try:
                return self._start(wait)
            except PortTaken:
                # free_port() let the port go before the service bound it, and on a
                # shared machine someone else took it meanwhile: other ports (first
                # start only: a restart keeps its addresses).
                if self._started or attempt == 2:
                    raise
                self._new_ports()
        raise AssertionError("unreachable")

    def _new_ports(self) -> None:
        old = {"port": self.port, "dialplan_port": self.dialplan_port, "metrics_port": self.metrics_port}
        for attr in old:
            setattr(self, attr, free_port())
        for section, key, attr in (("server", "listen", "port"), ("dialplan", "listen", "dialplan_port"),
                                   ("metrics", "listen", "metrics_port")):
            if self.sections[section].get(key) == f"127.0.0.1:{old[attr]}":
                self.sections[section][key] = f"127.0.0.1:{getattr(self, attr)}"
        self.sections["server"]["public_url"] = self.url
        self.write_config(self.sections, self._tenants)

    def _start(self, wait: float) -> "ServiceProcess":
        self._log = open(self.log_path, "ab")
        self._log_start = self._log.tell()  # this start's lines begin here
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fsbridge", "run", "-c", str(self.config_path)],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            self._wait_serving(wait)
        except BaseException:
            # A start that fails must not leave the process behind: `with`
            # never reaches __exit__ when __enter__ raises.
            self.kill()
            raise
        self._started = True
        return self

    def _wait_serving(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log()
                if "cannot listen: Address already in use" in log[self._log_start:]:
                    raise PortTaken(log)
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{log}")
            try:
                # 200 (ok) or 503 (degraded, e.g. FreeSWITCH not yet connected):
                # either way the service is up and answering.
                if unverified(requests.get, self.url + "/healthz", timeout=1).status_code in (200, 503):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"service did not answer /healthz in {wait}s:\n{self.log()}")

    def write_tenants(self, tenants: dict[str, dict[str, str]]) -> None:
        """Rewrite the config with these ``[tenant.*]`` sections (then ``reload()``)."""
        self._tenants = tenants
        self.write_config(self.sections, tenants)

    def reload(self) -> None:
        """SIGHUP: the running service re-reads its config."""
        assert self.proc is not None and self.proc.poll() is None, "service not running"
        self.proc.send_signal(signal.SIGHUP)

    def health(self) -> dict:
        """The detailed /healthz (loopback dialplan listener), whether 200 (ok) or 503 (degraded)."""
        return requests.get(self.dialplan_url + "/healthz", timeout=5).json()

    def wait_health(self, predicate, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        health = self.health()
        while not predicate(health):
            if time.monotonic() > deadline:
                raise AssertionError(f"health never matched: {health}\n{self.log()[-4000:]}")
            time.sleep(0.05)
            health = self.health()
        return health

    def post(self, **fields: str) -> requests.Response:
        return unverified(requests.post, self.url + "/planfix", data=fields, timeout=10)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"service ignored SIGTERM for {timeout}s:\n{self.log()}")
        code = self.proc.returncode
        self._close()
        return code

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self._close()

    def _close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            try:
                self.stop()
            except AssertionError:
                pass  # it ignored SIGTERM and was killed; the test's own outcome stands
            finally:
                self.kill()  # whatever stop() raised, the process does not outlive the block
