import sys

from grok1.serve.cli import main

sys.exit(main())
