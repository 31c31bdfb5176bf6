"""compute_ema's kept pairings: each (model, ema_model) is paired once, then checked cheaply on each call.

compute_ema is called every step with the same two models. Walking both module trees, canonicalising every
name and pairing and grouping the tensors costs far more than the update itself for small models or models
of many small tensors, so the pairing (an :class:`~emakit.engine.plan.UpdatePlan`) is kept per
(model, ema_model), held weakly, and checked on each call (:meth:`_Pairing.current`).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from emakit.engine import registry
from emakit.engine.naming import canonical_name, is_averaged, unwrap_model
from emakit.engine.plan import UpdatePlan

__all__ = ["kept_plan", "update_kept"]

#: Where a tensor is read from, and the tensor: (module._parameters or module._buffers, key, tensor).
_Entry = tuple[dict[str, Any], str, torch.Tensor]
_GET = dict.__getitem__


class _Tree:
    """One module tree as compute_ema reads it, and a fingerprint of its structure that is cheap to check.

    ``entries`` are the tree's tensors by canonical name, parameters then buffers, each shared tensor once
    (as ``named_parameters`` and ``named_buffers`` list them), with where each is read from; the pairing
    drops them once paired. The fingerprint is the submodules of every module that has some, held weakly
    (a cache must never keep a model alive).
    """

    __slots__ = ("children", "entries", "parents", "widths")

    def __init__(self, model: nn.Module, what: str) -> None:
        self.parents: list[weakref.ref[nn.Module]] = []  # the modules that have submodules
        self.widths: list[int] = []  # how many submodules each has
        self.children: list[int] = []  # their ids, in order
        found: tuple[list[tuple[str, dict[str, Any], str, torch.Tensor]], ...] = ([], [])
        seen: tuple[set[int], set[int]] = (set(), set())
        visited: set[int] = set()
        stack: list[tuple[str, nn.Module]] = [("", model)]
        while stack:  # pre-order, each module once: named_modules' order
            prefix, module = stack.pop()
            if id(module) in visited:
                continue
            visited.add(id(module))
            tables: tuple[dict[str, Any], dict[str, Any]] = (module._parameters, module._buffers)
            for kind, table in enumerate(tables):
                for key, tensor in table.items():
                    if tensor is not None and id(tensor) not in seen[kind]:
                        seen[kind].add(id(tensor))
                        found[kind].append((prefix + key, table, key, tensor))
            submodules = module._modules
            if submodules:
                self.parents.append(weakref.ref(module))
                self.widths.append(len(submodules))
                self.children.extend(map(id, submodules.values()))
                for name, child in reversed(submodules.items()):
                    if child is not None:
                        stack.append((f"{prefix}{name}.", child))
        self.entries: dict[str, _Entry] = {}
        for raw, table, key, tensor in found[0] + found[1]:
            name = canonical_name(raw)
            if name in self.entries:
                raise ValueError(
                    f"{what} has two tensors named {name!r} once wrapper prefixes are removed (one is {raw!r})"
                )
            self.entries[name] = (table, key, tensor)

    def same_widths(self) -> bool:
        """Whether every module that had submodules still has as many (one ``len`` per such module)."""
        for ref, width in zip(self.parents, self.widths, strict=True):
            parent = ref()
            if parent is None or len(parent._modules) != width:
                return False
        return True

    def unchanged(self) -> bool:
        """Whether every module that had submodules still holds the same ones (``del``, direct edits of
        ``_modules`` and anything else behind torch's registration hooks)."""
        ids: list[int] = []
        for ref in self.parents:
            parent = ref()
            if parent is None:
                return False
            ids.extend(map(id, parent._modules.values()))
        return ids == self.children


def _pair(model: _Tree, ema_model: _Tree) -> tuple[list[str], list[_Entry], list[_Entry], list[bool]]:
    """The names, the (model, ema_model) entries paired by them, and per pair whether it is averaged."""
    model_entries, ema_entries = model.entries, ema_model.entries
    missing = [n for n in model_entries if n not in ema_entries]
    extra = [n for n in ema_entries if n not in model_entries]
    if missing:
        raise ValueError(f"tensor {missing[0]!r} is in model but missing from ema_model ({len(missing)} missing)")
    if extra:
        raise ValueError(f"tensor {extra[0]!r} is in ema_model but missing from model ({len(extra)} extra)")
    names, sources, targets, averaged = [], [], [], []
    for name, source in model_entries.items():
        target = ema_entries[name]
        src, dst = source[2], target[2]
        if dst.shape != src.shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(src.shape)} in model and {tuple(dst.shape)} in ema_model"
            )
        if is_averaged(src) != is_averaged(dst):
            raise ValueError(
                f"tensor {name!r} is {src.dtype} in model and {dst.dtype} in ema_model: "
                "floating tensors must pair with floating tensors, integer with integer"
            )
        names.append(name)
        sources.append(source)
        targets.append(target)
        averaged.append(is_averaged(src))
    return names, sources, targets, averaged


_LOW = (torch.float16, torch.bfloat16)


def _check_tensors(names: Sequence[str], sources: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
    """Refuse a side on the meta device (the update would change nothing, silently); warn once if the average is
    narrower than the model (an fp16 average of an fp32 model). Returns the average's 16-bit resolution."""
    for what, tensors in (("model", sources), ("ema_model", targets)):
        meta = next((n for n, t in zip(names, tensors, strict=True) if t.device.type == "meta"), None)
        if meta is not None:
            raise ValueError(
                f"{what}: tensor {meta!r} is on the meta device, which holds no values: compute_ema needs both "
                "models materialised on a real device (e.g. ema_model = copy.deepcopy(model), or "
                "to_empty(device=...) and load the weights)"
            )
    low = [(n, s, t) for n, s, t in zip(names, sources, targets, strict=True) if t.dtype in _LOW]
    narrower = [
        (n, s, t) for n, s, t in low if s.is_floating_point() and torch.finfo(s.dtype).eps < torch.finfo(t.dtype).eps
    ]
    if narrower:
        name, source, target = narrower[0]
        warnings.warn(
            f"compute_ema: ema_model keeps {target.dtype} tensors for the model's {source.dtype} ones ({name!r} and "
            f"{len(narrower) - 1} more): each update is rounded to {target.dtype}, whose resolution is "
            f"{torch.finfo(target.dtype).eps:.3g}, so updates round away, whole or in part, and the average lags "
            "far behind, the more so the longer its half-life. Keep the average in float32 "
            "(ema_model = copy.deepcopy(model).float())",
            stacklevel=5,
        )
    return max((torch.finfo(t.dtype).eps for _, _, t in low if t.is_floating_point()), default=0.0)


def _warn_rounding(resolution: float, weight: float) -> None:
    """Warn that a 16-bit average's update ``weight`` (1 - smoothing) is below its resolution and rounds away."""
    warnings.warn(
        f"compute_ema: ema_model keeps 16-bit floating tensors, whose resolution is {resolution:.3g}: "
        f"1 - smoothing = {weight:.3g} is below it, so updates round away, whole or in part, and the average lags "
        "far behind. Keep the average in float32 (ema_model = copy.deepcopy(model).float())",
        stacklevel=4,
    )


class _Pairing:
    """compute_ema's kept work for one (model, ema_model): both trees, the pairs' locations and the plan."""

    __slots__ = (
        "averaged",
        "ema_model",
        "model",
        "names",
        "plan",
        "resolution",
        "source_keys",
        "source_tables",
        "target_keys",
        "target_tables",
        "trees",
    )

    def __init__(self, model: nn.Module, ema_model: nn.Module, forget: Callable[[object], None]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(ema_model, nn.Module):
            raise TypeError(f"ema_model must be a torch.nn.Module, got {type(ema_model).__name__}")
        if unwrap_model(model) is unwrap_model(ema_model):
            how = "the same object" if model is ema_model else "wrappers of one module"
            raise ValueError(
                f"model and ema_model are {how} ({type(unwrap_model(model)).__name__}): compute_ema would blend it "
                "into itself and change nothing; pass the average as a separate copy, e.g. ema_model = "
                "copy.deepcopy(model)"
            )
        self.trees = (_Tree(model, "model"), _Tree(ema_model, "ema_model"))
        self.names, sources, targets, self.averaged = _pair(*self.trees)
        for tree in self.trees:
            tree.entries = {}  # a flat plan must hold no tensor, or its buffers' reference counts could not drop
        #: The coarsest resolution (eps) among the average's 16-bit floating tensors; 0.0 if it has none.
        self.resolution = _check_tensors(self.names, [t for _, _, t in sources], [t for _, _, t in targets])
        self.source_tables = [table for table, _, _ in sources]
        self.source_keys = [key for _, key, _ in sources]
        self.target_tables = [table for table, _, _ in targets]
        self.target_keys = [key for _, key, _ in targets]
        target_tensors = [t for _, _, t in targets]
        self.plan = UpdatePlan(target_tensors, [t for _, _, t in sources], self.averaged, protected=target_tensors)
        # Weak: the cache never keeps a model alive, and forgets this pairing when either model goes.
        self.model = weakref.ref(model, forget)
        self.ema_model = weakref.ref(ema_model, forget)

    def current(self, model: nn.Module, ema_model: nn.Module) -> bool:
        """Whether the plan still pairs these two models' tensors: far cheaper than pairing them again.

        - Parameters, buffers or submodules registered anywhere (``module.weight = nn.Parameter(...)``,
          ``load_state_dict(assign=True)``, a module added) change :func:`~emakit.engine.registry.registration_count`.
        - Submodules removed or replaced behind those hooks (``del model.fc``, ``model._modules[...] = ...``)
          change the trees' fingerprints.
        - Every tensor is read again where it lives (``module._parameters[key]``, ``module._buffers[key]``):
          a tensor replaced there (``model.to()`` replaces buffers) is another object, a deleted one is
          missing, and a tensor re-pointed in place (``param.data = ...``, ``model.to(dtype or device)`` on
          parameters, ``swap_tensors``) has moved its data.

        Flat plans (both models flattened alike) skip the reading and watch their buffers' reference
        counts instead (see :class:`UpdatePlan`). Not noticed: a tensor inserted under a new key straight
        into a module's ``_parameters`` or ``_buffers`` dict, which no torch API does.
        """
        if self.model() is not model or self.ema_model() is not ema_model:
            return False
        plan = self.plan
        source_tree, target_tree = self.trees
        if plan.reusable:
            return source_tree.same_widths() and target_tree.same_widths() and plan.is_current()
        if plan.registrations != registry._registrations or not (source_tree.unchanged() and target_tree.unchanged()):
            return False
        try:
            sources = list(map(_GET, self.source_tables, self.source_keys))
            targets = list(map(_GET, self.target_tables, self.target_keys))
        except KeyError:  # a tensor deleted from its module
            return False
        return plan.is_current(sources, targets, data=False)  # the data is checked as the plan runs

    def run_some(self, names: Sequence[str], weight: float) -> None:
        """Update only the pairs of ``names``, with a plan made for them now (the rest ran already)."""
        wanted = set(names)
        targets = list(map(_GET, self.target_tables, self.target_keys))
        sources = list(map(_GET, self.source_tables, self.source_keys))
        pick = [i for i, name in enumerate(self.names) if name in wanted]
        some = ([targets[i] for i in pick], [sources[i] for i in pick], [self.averaged[i] for i in pick])
        UpdatePlan(*some, protected=targets).run(weight)


#: (id(model), id(ema_model)) -> the kept pairing; an entry goes when either model is garbage collected.
_pairings: dict[tuple[int, int], _Pairing] = {}


def _forgetter(key: tuple[int, int]) -> Callable[[object], None]:
    def forget(_: object) -> None:
        _pairings.pop(key, None)

    return forget


def update_kept(model: nn.Module, ema_model: nn.Module, weight: float) -> None:
    """``ema_model <- ema_model + weight * (model - ema_model)`` with the pairing kept for these two models.

    The pairing is made on the first call and kept; later calls run it if :meth:`_Pairing.current`, and pair
    afresh otherwise (only the pairs not yet run, when a chunk finds a tensor moved as it runs).
    """
    key = (id(model), id(ema_model))
    pairing = _pairings.get(key)
    left: list[str] | None = None
    if pairing is not None and pairing.current(model, ema_model):
        if 0.0 < weight < pairing.resolution:
            _warn_rounding(pairing.resolution, weight)
        unrun = pairing.plan.run_checked(weight)
        if unrun is None:
            return
        left = [pairing.names[i] for i in unrun]  # a tensor moved since: these pairs have not run
    _pairings.pop(key, None)
    del pairing  # release the old plan's spans before the new plan counts references
    pairing = _Pairing(model, ema_model, _forgetter(key))
    _pairings[key] = pairing
    if 0.0 < weight < pairing.resolution:
        _warn_rounding(pairing.resolution, weight)
    if left is None:
        pairing.plan.run(weight)
    else:
        pairing.run_some(left, weight)


def kept_plan(model: nn.Module, ema_model: nn.Module) -> UpdatePlan | None:
    """The plan compute_ema keeps for these two models, if any (for tests and benchmarks)."""
    pairing = _pairings.get((id(model), id(ema_model)))
    return pairing.plan if pairing is not None and pairing.model() is model else None
