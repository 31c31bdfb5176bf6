"""Old path of :mod:`emakit.engine.storage` (flat storage for the averages), kept so that old imports work."""

from emakit.engine.storage import ALIGN_ELEMENTS, FlatStorage, check_state_matches, packed_offsets, storage_dtype

__all__ = ["ALIGN_ELEMENTS", "FlatStorage", "check_state_matches", "packed_offsets", "storage_dtype"]
