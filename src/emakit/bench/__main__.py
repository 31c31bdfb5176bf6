"""``python -m emakit.bench``: the same as ``emakit bench``."""

from emakit.bench import main

raise SystemExit(main())
