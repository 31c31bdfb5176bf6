"""Old path of :mod:`emakit.engine.overlap` (an update run alongside the next step), kept so that old imports work."""

from emakit.engine.overlap import Overlap, StreamOverlap, ThreadOverlap, make_overlap

__all__ = ["Overlap", "StreamOverlap", "ThreadOverlap", "make_overlap"]
