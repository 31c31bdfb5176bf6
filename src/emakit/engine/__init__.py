"""The update engine: how an EMA update runs, below every way of asking for one.

One job per module, lowest first:

- :mod:`~emakit.engine.naming`: canonical names (wrapper prefixes removed), where a named tensor lives,
  which tensors are averaged (floating) and which copied (integer, bool).
- :mod:`~emakit.engine.kernels`: one average's update, ``lerp_`` or copy, per tensor group or flat span.
- :mod:`~emakit.engine.blend`: several averages of the same weights, with one read of the weights.
- :mod:`~emakit.engine.memory` and :mod:`~emakit.engine.registry`: facts a kept plan checks cheaply (where a
  tensor's data lives; how many tensors torch has registered or replaced).
- :mod:`~emakit.engine.plan`: :class:`UpdatePlan`, the pairs prepared once and run again and again, and
  whether it is still current.
- :mod:`~emakit.engine.pairing`: :func:`~emakit.functional.compute_ema`'s pairing kept per pair of models.
- :mod:`~emakit.engine.storage` (flat buffers for averages), :mod:`~emakit.engine.flatten` (a model's
  tensors re-pointed into such buffers), :mod:`~emakit.engine.overlap` (an update run alongside the next step).

Nothing here knows about trainers, events or checkpoints. Names are imported on first use, so importing
one module of the engine does not import the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emakit._lazy import lazy_names

if TYPE_CHECKING:
    from emakit.engine.blend import PreparedBlend, blend_averages_
    from emakit.engine.flatten import flatten_model_, is_flattened
    from emakit.engine.kernels import copy_tensors_, lerp_flat_, lerp_tensors_, validate_smoothing
    from emakit.engine.naming import canonical_name, is_averaged, named_tensors, tensor_slots, unwrap_model
    from emakit.engine.overlap import Overlap, make_overlap
    from emakit.engine.plan import UpdatePlan
    from emakit.engine.registry import registration_count
    from emakit.engine.storage import FlatStorage

__all__ = [
    "FlatStorage",
    "Overlap",
    "PreparedBlend",
    "UpdatePlan",
    "blend_averages_",
    "canonical_name",
    "copy_tensors_",
    "flatten_model_",
    "is_averaged",
    "is_flattened",
    "lerp_flat_",
    "lerp_tensors_",
    "make_overlap",
    "named_tensors",
    "registration_count",
    "tensor_slots",
    "unwrap_model",
    "validate_smoothing",
]

_LAZY: dict[str, str] = {
    "FlatStorage": "emakit.engine.storage",
    "Overlap": "emakit.engine.overlap",
    "PreparedBlend": "emakit.engine.blend",
    "UpdatePlan": "emakit.engine.plan",
    "blend_averages_": "emakit.engine.blend",
    "canonical_name": "emakit.engine.naming",
    "copy_tensors_": "emakit.engine.kernels",
    "flatten_model_": "emakit.engine.flatten",
    "is_averaged": "emakit.engine.naming",
    "is_flattened": "emakit.engine.flatten",
    "lerp_flat_": "emakit.engine.kernels",
    "lerp_tensors_": "emakit.engine.kernels",
    "make_overlap": "emakit.engine.overlap",
    "named_tensors": "emakit.engine.naming",
    "registration_count": "emakit.engine.registry",
    "tensor_slots": "emakit.engine.naming",
    "unwrap_model": "emakit.engine.naming",
    "validate_smoothing": "emakit.engine.kernels",
}


__getattr__, __dir__ = lazy_names(__name__, __all__, _LAZY)
