"""Files shipped inside the package: the config sample, the systemd unit, the dialplan.

They live at the top of the repo (`conf/`, `dialplan/`) and are installed as
the data packages `fsbridge.conf` and `fsbridge.dialplan`, so an installed
fsbridge finds them wherever it runs.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent


def _data(package: str, checkout_dir: str) -> Traversable:
    try:
        return resources.files(package)
    except ModuleNotFoundError:
        # An editable install (`make`'s .venv) maps only `fsbridge` itself:
        # there the data packages are the checkout's own directories.
        return _CHECKOUT / checkout_dir


def conf_file(name: str) -> Traversable:
    """A file of `conf/` (``fsbridge.ini``, ``fsbridge.service``)."""
    return _data("fsbridge.conf", "conf") / name


def sample_config() -> Traversable:
    return conf_file("fsbridge.ini")


def dialplan_files() -> list[Traversable]:
    """The dialplan XML files, by name."""
    return sorted((f for f in _data("fsbridge.dialplan", "dialplan").iterdir() if f.name.endswith(".xml")),
                  key=lambda f: f.name)
