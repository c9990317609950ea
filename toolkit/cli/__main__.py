"""`python -m toolkit.cli` = `phi3` (for a checkout that is not installed)."""

from . import main

main(prog_name="phi3")
