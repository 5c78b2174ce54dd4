"""The shipped systemd unit: sandboxed (systemd-analyze score), and the
directives the README and fsbridge's exit codes rely on."""

import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO

UNIT = REPO / "conf" / "fsbridge.service"
MAX_EXPOSURE = 2.0


def directives() -> dict[str, list[str]]:
    """Directive -> its values, in order (a directive may repeat)."""
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_unit_directives_the_service_relies_on():
    unit = directives()
    assert unit["StateDirectory"] == ["fsbridge"]  # [storage] dir = /var/lib/fsbridge
    assert unit["RestartPreventExitStatus"] == ["2"]  # a config error (exit 2) must not loop
    # convert = mp3 and retention_days write in the recordings directory
    assert set(unit["ReadWritePaths"]) == {"-/var/lib/freeswitch/recordings", "-/usr/local/freeswitch/recordings"}
    assert "ReadOnlyPaths" not in unit
    text = UNIT.read_text()
    assert "#AmbientCapabilities=CAP_NET_BIND_SERVICE" in text  # documented for ports below 1024


def test_systemd_analyze_security_score():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    if match is None and "--offline" in result.stderr:
        pytest.skip(f"this systemd-analyze cannot score a unit file offline: {result.stderr.strip()}")
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= MAX_EXPOSURE, result.stdout
