"""Old path of :mod:`emakit.engine.flatten` (a model's tensors in flat buffers), kept so that old imports work."""

from emakit.engine.flatten import flatten_model_, is_flattened

__all__ = ["flatten_model_", "is_flattened"]
