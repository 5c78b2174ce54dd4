"""`python -m fsbridge` is the same as the `fsbridge` command."""

import sys

from fsbridge.cli import main

sys.exit(main())
