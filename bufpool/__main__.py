"""``python -m bufpool``: command-line tools (floor 4).  ``loadtest`` is the one there is;
with no arguments the help is printed."""

from __future__ import annotations

import sys


def main() -> int:
    """Console-script entry point (``bufpool = "bufpool.__main__:main"``)."""
    from bufpool.loadtest import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
