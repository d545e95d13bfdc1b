"""`plm-serve` command. The HTTP server is not built yet; today the command runs the offline chat."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from plm_core.__main__ import main as offline_main

    return offline_main(argv)


if __name__ == "__main__":
    sys.exit(main())
