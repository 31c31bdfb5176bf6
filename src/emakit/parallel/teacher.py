"""A module sharded like a DTensor model whose parameters are given shards: the EMA teacher of a sharded student.

:func:`sharded_teacher` copies the structure of an FSDP2-sharded model (the original classes, without FSDP's
state or hooks) and gives each parameter a DTensor wrapping a given local shard (the average's own storage, not
copied) on the student's mesh with the student's placements. Each module that is an FSDP unit of the student
gathers its own parameters before its forward and drops the gathered tensors after it, so at most one unit
(plus the root's) is whole at a time, as FSDP2 does for the student. Nothing needs gradients: the gathered
tensors are plain tensors, and the teacher's parameters never require grad.

Tensor parallelism (``parallelize_module``: DTensor parameters outside every FSDP unit) needs no gathering: the
teacher's parameters keep the student's placements, and the copied modules keep the student's forward hooks
(TP's input and output redistributions, which take the module as an argument and close over the mesh only), so
the teacher runs the student's tensor-parallel forward on the average's shards. FSDP2 and TP on one parameter
(a 2-D mesh) is gathered as FSDP2 gathers it: over FSDP2's mesh dimensions only, into a DTensor on the TP
submesh with the TP placements, which the TP hooks expect. Buffers are taken as given.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from emakit._compat import dtensor_type, fsdp_module_type
from emakit.parallel.sharding import sharded_like

__all__ = ["drop_copied_methods", "sharded_teacher"]

#: Attributes FSDP2 sets on the modules it manages (for torch.compile); the teacher is not managed by FSDP.
_FSDP_FLAGS = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")
#: The attributes where torch's composable APIs (FSDP2 among them) record that they manage a module.
_COMPOSABLE_STATE = "__composable_api_state_key"


def sharded_teacher(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model``'s structure (sharded by FSDP2, resharded, or tensor-parallel) whose tensor ``name`` is
    ``tensors[name]``.

    ``tensors`` are local shards for DTensor parameters (wrapped as DTensors sharded like the model's, with no
    copy) and whole tensors for buffers. Parameters and buffers not in ``tensors`` are shared with ``model``.
    The copy is in eval mode and none of its parameters requires grad.

    """
    fsdp_module = fsdp_module_type()
    units = [m for m in model.modules() if fsdp_module is not None and isinstance(m, fsdp_module)]
    memo: dict[int, Any] = {}
    for name, original in _named_tensors(model):
        if name in tensors and id(original) not in memo:
            local = tensors[name]
            if isinstance(original, nn.Parameter):
                memo[id(original)] = nn.Parameter(sharded_like(local, original), requires_grad=False)
            else:
                memo[id(original)] = local
    teacher = _plain_copy(model, memo)
    drop_copied_methods(model, teacher)
    copies = {id(m): c for m, c in zip(model.modules(), teacher.modules(), strict=True)}
    unit_ids = {id(u) for u in units}
    for unit in units:
        managed = _managed_slots(copies[id(unit)], unit, unit_ids, copies)
        if managed:
            copy_unit = copies[id(unit)]
            copy_unit.register_forward_pre_hook(functools.partial(_gather, managed))
            copy_unit.register_forward_hook(functools.partial(_release, managed), always_call=True)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher.eval()


def drop_copied_methods(original: nn.Module, copied: nn.Module) -> None:
    """Remove from each module of ``copied`` (a copy of ``original``) the functions it shares with the original
    under the name of a method of its class, so that the class's method, bound to the copy, runs.

    ``model.forward = torch.compile(model.forward)`` (which Lightning does for a compiled LightningModule) stores
    in the module a function that calls the original module's ``forward``; copying keeps that function, so the
    copy would compute with the original's weights. Bound methods are rebound by copying and stay.
    """
    for source, target in zip(original.modules(), copied.modules(), strict=True):
        for key, value in list(vars(target).items()):
            shadowed = getattr(type(target), key, None)
            if (
                callable(value)
                and vars(source).get(key) is value
                and callable(shadowed)
                and not isinstance(value, nn.Module)
            ):
                del target.__dict__[key]


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    named: list[tuple[str, torch.Tensor]] = list(model.named_parameters(remove_duplicate=False))
    return named + list(model.named_buffers(remove_duplicate=False))


def _fsdp_dims(placements: tuple[Any, ...]) -> int:
    """How many leading mesh dimensions of an FSDP2 parameter are FSDP2's: 2 for HSDP (a replica dimension,
    then the shard), else 1. FSDP2 appends the parameter's TP placements after them."""
    return 2 if len(placements) >= 2 and placements[0].is_replicate() else 1


def _unsharded(parameter: Any) -> torch.Tensor:
    """``parameter`` as FSDP2 gathers it: whole, or under TP a DTensor on the TP submesh with the TP placements
    (gathered over FSDP2's dimensions only)."""
    placements = tuple(parameter.placements)
    dims = _fsdp_dims(placements)
    if len(placements) == dims:
        return parameter.full_tensor()
    try:
        from torch.distributed.tensor import Replicate
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import Replicate
    mesh, tp = parameter.device_mesh, placements[dims:]
    names = mesh.mesh_dim_names[dims:]  # FSDP2 finds the TP submesh by name too: a 2-D mesh has names
    tp_mesh = mesh[names[0]] if len(names) == 1 else mesh[tuple(names)]
    local = parameter.redistribute(mesh, [Replicate()] * dims + list(tp)).to_local()
    return type(parameter).from_local(
        local, tp_mesh, tp, run_check=False, shape=parameter.shape, stride=parameter.stride()
    )


def _plain_copy(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``module`` copied with its original classes (FSDP's removed), FSDP's hooks and flags dropped, and
    the tensors in ``memo`` replaced; the other tensors shared; shared submodules stay shared."""
    if id(module) in memo:
        return memo[id(module)]
    cls: type[nn.Module] = type(module)
    fsdp_module = fsdp_module_type()
    if fsdp_module is not None and isinstance(module, fsdp_module):
        # the class fully_shard derived (FSDP<Name>(FSDPModule, Name)): the first class of its MRO that is not
        # FSDP's (torch >= 2.10 also records its index as _orig_cls_mro_index)
        cls = next(c for c in cls.__mro__[1:] if not issubclass(c, fsdp_module))
    state = dict(module.__getstate__())
    copied = cls.__new__(cls)
    memo[id(module)] = copied
    for key in [k for k in state if k in _FSDP_FLAGS or k.startswith(_COMPOSABLE_STATE)]:
        del state[key]
    state["_parameters"] = {k: None if p is None else memo.get(id(p), p) for k, p in module._parameters.items()}
    state["_buffers"] = {k: None if b is None else memo.get(id(b), b) for k, b in module._buffers.items()}
    state["_modules"] = {k: None if m is None else _plain_copy(m, memo) for k, m in module._modules.items()}
    for key, value in list(state.items()):
        if key.endswith("hooks") and isinstance(value, dict):
            state[key] = value.__class__((k, h) for k, h in value.items() if not _is_fsdp_hook(h))
        elif key not in ("_parameters", "_buffers", "_modules"):
            state[key] = copy.deepcopy(value, memo)
    copied.__setstate__(state)
    return copied


def _is_fsdp_hook(hook: Any) -> bool:
    target = getattr(hook, "hook", hook)  # torch wraps some hooks (_WrappedHook)
    target = target.func if isinstance(target, functools.partial) else target
    return str(getattr(target, "__module__", "")).startswith("torch.distributed.fsdp")


def _managed_slots(
    copy_unit: nn.Module, unit: nn.Module, unit_ids: set[int], copies: Mapping[int, nn.Module]
) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """The (module, key, DTensor parameter) slots of ``copy_unit`` that the student's ``unit`` manages itself:
    its subtree's parameters outside nested units (as FSDP2 assigns them)."""
    dtensor = dtensor_type()
    slots: list[tuple[nn.Module, str, nn.Parameter]] = []

    def visit(module: nn.Module) -> None:
        copied = copies[id(module)]
        for key, parameter in copied._parameters.items():
            if parameter is not None and dtensor is not None and isinstance(parameter, dtensor):
                slots.append((copied, key, parameter))
        for child in module.children():
            if id(child) not in unit_ids:
                visit(child)

    visit(unit)
    assert copies[id(unit)] is copy_unit
    return slots


def _gather(slots: list[tuple[nn.Module, str, nn.Parameter]], module: nn.Module, args: Any) -> None:
    """Before the unit's forward: its parameters unsharded (one all-gather each; every rank runs it)."""
    with torch.no_grad():
        whole: dict[int, Any] = {id(p): _unsharded(p) for p in {id(p): p for _, _, p in slots}.values()}
    for owner, key, parameter in slots:
        owner._parameters[key] = whole[id(parameter)]


def _release(slots: list[tuple[nn.Module, str, nn.Parameter]], module: nn.Module, args: Any, output: Any) -> None:
    """After the unit's forward: the sharded parameters back, the whole tensors dropped."""
    for owner, key, parameter in slots:
        owner._parameters[key] = parameter
