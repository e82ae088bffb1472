"""`python -m clients`: the dimml-score command line (clients/cli.py)."""
import sys

from clients.cli import main

sys.exit(main())
