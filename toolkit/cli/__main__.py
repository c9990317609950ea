"""`python -m toolkit.cli` = `phi3` (for a checkout that is not installed)."""

from . import run

run()
