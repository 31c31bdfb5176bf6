"""Old path of :mod:`emakit.engine.blend` (several averages updated with one read of the weights), kept so that
old imports work.

``python -m emakit.posthoc.kernels`` runs the timing of :mod:`emakit.engine.blend_timing` (``--help`` for its
options).
"""

from emakit.engine.blend import PreparedBlend, blend_averages_, chunk_elements
from emakit.engine.blend_timing import cli, main

__all__ = ["PreparedBlend", "blend_averages_", "chunk_elements", "main"]

if __name__ == "__main__":
    raise SystemExit(cli(prog="python -m emakit.posthoc.kernels"))
