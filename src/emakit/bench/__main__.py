"""``python -m emakit.bench``: the same as ``emakit bench``."""

import sys

from emakit.bench import main

if __name__ == "__main__":
    sys.exit(main())
