"""`python -m imageclf ...`: the `imageclf` command, where its console script is not on PATH."""

import sys

from imageclf.cli import main

sys.exit(main())
