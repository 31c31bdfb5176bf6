"""What one EMA update costs: emakit, the memory-bound limit and installed peers (same as ``emakit bench``).

python benchmarks/update_cost.py [--quick] [--shapes resnet,vit,many] [--repeats N] [--threads N]
"""

from __future__ import annotations

from emakit.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
