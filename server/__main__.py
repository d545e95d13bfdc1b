"""`python -m server`: the same as the `plm-serve` command."""

import sys

from server.cli import main

sys.exit(main())
