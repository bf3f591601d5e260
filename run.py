"""Sample text from Grok-1: `python run.py --prompt "..."` (see `python run.py --help`)."""

import sys

from grok1.cli import main

if __name__ == "__main__":
    sys.exit(main())
