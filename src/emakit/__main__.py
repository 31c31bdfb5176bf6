"""``python -m emakit``: the same as the ``emakit`` command."""

import sys

from emakit.cli import main

if __name__ == "__main__":
    sys.exit(main())
