"""`python -m dimml`: the `dimml` command line (dimml/cli.py)."""
import sys

from dimml.cli import main

sys.exit(main())
