"""compute_ema keeps its pairing between calls: every change to either model is noticed, never stale.

Each test changes a model the way users do between two ``compute_ema`` calls and compares the EMA with a
naive per-tensor step computed from the models as they are at that moment (by name, in float64).
"""

from __future__ import annotations

import copy
import gc
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import emakit.engine.pairing as engine_pairing
import emakit.functional as ef
from conftest import TinyNet, make_model
from emakit.engine.naming import tensor_slots
from emakit.engine.pairing import kept_plan
from emakit.engine.plan import _CHUNK_PAIRS

S = 0.5  # a step moves every value halfway: a stale read or write cannot hide


def plain_name(name: str) -> str:
    for prefix in ("_orig_mod.", "module."):
        name = name.replace(prefix, "")
    return name


def by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {plain_name(n): t for n, t in tensors.items()}


def naive_step(model: nn.Module, ema_model: nn.Module, smoothing: float = S) -> dict[str, torch.Tensor]:
    """What ema_model's tensors must be after one update from model, computed per tensor in float64."""
    source = by_name(model)
    expected = {}
    for name, e in by_name(ema_model).items():
        p = source[name].detach().to(e.device)
        if e.is_floating_point():
            expected[name] = (smoothing * e.detach().double() + (1 - smoothing) * p.double()).to(e.dtype)
        else:
            expected[name] = p.clone()
    return expected


def step_and_check(model: nn.Module, ema_model: nn.Module, steps: int = 2, seed: int = 0) -> None:
    """Change the model's values, update, compare with the naive step; ``steps`` times."""
    for k in range(steps):
        perturb(model, seed + k)
        expected = naive_step(model, ema_model)
        ef.compute_ema(model, ema_model, S)
        actual = by_name(ema_model)
        assert set(actual) == set(expected)
        for name, want in expected.items():
            assert actual[name].dtype == want.dtype, name
            torch.testing.assert_close(actual[name].detach(), want, msg=name)


def perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type != "cpu":
                continue
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g).to(t.dtype))
            else:
                t.add_(3)


def pair() -> tuple[TinyNet, TinyNet]:
    model, ema_model = make_model(0), make_model(1)
    perturb(ema_model, 99)
    return model, ema_model


def test_the_kept_plan_is_reused_while_nothing_changes() -> None:
    model, ema_model = pair()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step_and_check(model, ema_model, steps=1)
    plan = kept_plan(model, ema_model)
    assert plan is not None and plan.loose  # separate tensors: the grouped multi-tensor path
    for k in range(3):
        model(torch.randn(8, 4)).sum().backward()  # BatchNorm updates its buffers in place
        opt.step()
        opt.zero_grad()
        step_and_check(model, ema_model, steps=1, seed=10 + k)
        assert kept_plan(model, ema_model) is plan


# ------------------------------------------------------------------ every change noticed
def replace_parameter(model: nn.Module, ema_model: nn.Module) -> None:
    model.fc1.weight = nn.Parameter(torch.full_like(model.fc1.weight, 3.0))


def replace_ema_parameter(model: nn.Module, ema_model: nn.Module) -> None:
    ema_model.fc2.bias = nn.Parameter(torch.full_like(ema_model.fc2.bias, -3.0))


def data_same_dtype(model: nn.Module, ema_model: nn.Module) -> None:
    model.fc1.weight.data = torch.full_like(model.fc1.weight, 2.0)  # same Parameter, new storage


def data_new_dtype(model: nn.Module, ema_model: nn.Module) -> None:
    model.fc1.weight.data = model.fc1.weight.data.double()


def ema_data_new_dtype(model: nn.Module, ema_model: nn.Module) -> None:
    ema_model.fc2.weight.data = ema_model.fc2.weight.data.double()


def data_of_a_buffer(model: nn.Module, ema_model: nn.Module) -> None:
    model.bn.running_var.data = torch.full_like(model.bn.running_var, 7.0, dtype=torch.float64)


def model_to_dtype(model: nn.Module, ema_model: nn.Module) -> None:
    model.to(torch.float64)  # parameters re-pointed in place, buffers replaced


def ema_model_to_dtype(model: nn.Module, ema_model: nn.Module) -> None:
    ema_model.to(torch.float64)


def parameters_only_to_dtype(model: nn.Module, ema_model: nn.Module) -> None:
    model.fc1.to(torch.bfloat16)  # a module without buffers: nothing but .data changes


def to_with_overwrite(model: nn.Module, ema_model: nn.Module) -> None:
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.to(torch.float64)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)


def to_with_swap(model: nn.Module, ema_model: nn.Module) -> None:
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to(torch.float64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


def swap_tensors(model: nn.Module, ema_model: nn.Module) -> None:
    torch.utils.swap_tensors(model.fc2.weight, nn.Parameter(torch.full_like(model.fc2.weight, 5.0)))


def buffer_dict_entry(model: nn.Module, ema_model: nn.Module) -> None:
    model.bn._buffers["running_mean"] = torch.full_like(model.bn.running_mean, 4.0)  # no registration hook


def ema_buffer_dict_entry(model: nn.Module, ema_model: nn.Module) -> None:
    ema_model.bn._buffers["running_mean"] = torch.full_like(ema_model.bn.running_mean, 4.0)


def load_state_dict_assign(model: nn.Module, ema_model: nn.Module) -> None:
    model.load_state_dict({n: torch.full_like(t, 0.25) for n, t in model.state_dict().items()}, assign=True)


def ema_load_state_dict_assign(model: nn.Module, ema_model: nn.Module) -> None:
    state = {n: torch.full_like(t, -0.25) for n, t in ema_model.state_dict().items()}
    ema_model.load_state_dict(state, assign=True)


def module_added_to_both(model: nn.Module, ema_model: nn.Module) -> None:
    model.extra = nn.Linear(2, 2)
    ema_model.extra = nn.Linear(2, 2)


def module_removed_from_both(model: nn.Module, ema_model: nn.Module) -> None:
    del model.fc2
    del ema_model.fc2


def module_replaced_in_the_dict(model: nn.Module, ema_model: nn.Module) -> None:
    model._modules["fc2"] = nn.Linear(8, 3)  # behind the hooks, as some model surgery tools do


def ema_module_replaced_in_the_dict(model: nn.Module, ema_model: nn.Module) -> None:
    ema_model._modules["fc1"] = nn.Linear(4, 8)


def buffer_deleted_from_both(model: nn.Module, ema_model: nn.Module) -> None:
    del model.bn.running_var
    del ema_model.bn.running_var


CHANGES = [
    replace_parameter,
    replace_ema_parameter,
    data_same_dtype,
    data_new_dtype,
    ema_data_new_dtype,
    data_of_a_buffer,
    model_to_dtype,
    ema_model_to_dtype,
    parameters_only_to_dtype,
    to_with_overwrite,
    to_with_swap,
    swap_tensors,
    buffer_dict_entry,
    ema_buffer_dict_entry,
    load_state_dict_assign,
    ema_load_state_dict_assign,
    module_added_to_both,
    module_removed_from_both,
    module_replaced_in_the_dict,
    ema_module_replaced_in_the_dict,
    buffer_deleted_from_both,
]


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_between_calls_is_followed(change: Callable[[nn.Module, nn.Module], None]) -> None:
    model, ema_model = pair()
    # Whatever is replaced stays alive (optimizers hold parameters): the plan must not rely on it being freed.
    held = [*model.parameters(), *model.buffers(), *ema_model.parameters(), *ema_model.buffers()]
    step_and_check(model, ema_model)
    change(model, ema_model)
    step_and_check(model, ema_model, seed=5)
    del held


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_between_calls_of_flattened_models_is_followed(change: Callable[[nn.Module, nn.Module], None]) -> None:
    """Flattened models are checked without reading every tensor (see UpdatePlan): replaced tensors are
    noticed when they are released, re-pointed ones at once."""
    from emakit.engine.flatten import flatten_model_

    model, ema_model = pair()
    flatten_model_(model)
    flatten_model_(ema_model)
    step_and_check(model, ema_model)
    plan = kept_plan(model, ema_model)
    assert plan is not None and plan.reusable
    held = list(model.parameters()) if change is not to_with_overwrite else []  # an optimizer holds them
    change(model, ema_model)
    step_and_check(model, ema_model, seed=5)
    del held


def test_a_module_removed_from_one_side_is_an_error() -> None:
    model, ema_model = pair()
    step_and_check(model, ema_model, steps=1)
    del ema_model.fc2
    with pytest.raises(ValueError, match=r"tensor 'fc2\.weight' is in model but missing from ema_model"):
        ef.compute_ema(model, ema_model, S)


def test_a_changed_shape_is_an_error() -> None:
    model, ema_model = pair()
    step_and_check(model, ema_model, steps=1)
    model.fc1.weight.data = torch.zeros(8, 5)
    with pytest.raises(ValueError, match=r"tensor 'fc1\.weight' has shape \(8, 5\) in model and \(8, 4\) in ema_model"):
        ef.compute_ema(model, ema_model, S)


# ------------------------------------------------------------------ wrapping after the first call
def test_torch_compile_after_the_first_call() -> None:
    model, ema_model = pair()
    step_and_check(model, ema_model)
    compiled = torch.compile(model, backend="eager")
    step_and_check(compiled, ema_model, seed=3)  # another object: paired afresh, through '_orig_mod.'
    step_and_check(model, torch.compile(ema_model, backend="eager"), seed=6)


def test_ddp_after_the_first_call(tmp_path: Path) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)

    # the DDP objects are freed before the process group is destroyed: freed later, they can hang in teardown
    def run() -> None:
        model, ema_model = pair()
        step_and_check(model, ema_model)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        ddp(torch.randn(8, 4)).sum().backward()
        opt.step()
        step_and_check(ddp, ema_model, seed=3)

    try:
        run()
    finally:
        gc.collect()
        dist.destroy_process_group()


# ------------------------------------------------------------------ one module passed twice
def test_the_same_module_twice_is_an_error() -> None:
    model = make_model(0)
    with pytest.raises(ValueError, match=r"model and ema_model are the same object \(TinyNet\)"):
        ef.compute_ema(model, model, 0.9)
    with pytest.raises(ValueError, match=r"model and ema_model are wrappers of one module \(TinyNet\).*deepcopy"):
        ef.compute_ema(torch.compile(model, backend="eager"), model, 0.9)
    with pytest.raises(ValueError, match=r"model and ema_model are wrappers of one module"):
        ef.compute_ema(nn.DataParallel(model), torch.compile(model, backend="eager"), 0.9)


def test_shared_frozen_tensors_are_allowed() -> None:
    """An EMA model may share tensors it does not average (frozen embeddings): blending x into x keeps x."""
    model, ema_model = pair()
    ema_model.fc1.weight = model.fc1.weight
    step_and_check(model, ema_model)


# ------------------------------------------------------------------ the cache holds models weakly
def test_kept_pairings_do_not_keep_models_alive() -> None:
    model, ema_model = pair()
    ef.compute_ema(model, ema_model, S)
    key = (id(model), id(ema_model))
    assert key in engine_pairing._pairings
    refs = weakref.ref(model), weakref.ref(ema_model)
    del model
    gc.collect()
    assert refs[0]() is None and key not in engine_pairing._pairings
    assert refs[1]() is not None
    del ema_model
    gc.collect()
    assert refs[1]() is None


def test_a_model_whose_submodule_points_back_at_it_is_still_freed() -> None:
    model, ema_model = pair()
    object.__setattr__(model.fc1, "owner", model)  # a cycle through a plain attribute
    ef.compute_ema(model, ema_model, S)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


# ------------------------------------------------------------------ property: any sequence of changes
SEQUENCE_CHANGES = [
    None,  # a plain step
    data_same_dtype,
    data_new_dtype,
    ema_data_new_dtype,
    replace_parameter,
    buffer_dict_entry,
    model_to_dtype,
    swap_tensors,
    module_replaced_in_the_dict,
    load_state_dict_assign,
]


@settings(max_examples=40, deadline=None)
@given(
    changes=st.lists(st.sampled_from(range(len(SEQUENCE_CHANGES))), min_size=1, max_size=6),
    smoothing=st.floats(0.0, 1.0),
)
def test_any_sequence_of_changes_matches_the_naive_steps(changes: list[int], smoothing: float) -> None:
    model, ema_model = pair()
    for k, index in enumerate(changes):
        change = SEQUENCE_CHANGES[index]
        if change is not None:
            change(model, ema_model)
        perturb(model, k)
        expected = naive_step(model, ema_model, smoothing)
        ef.compute_ema(model, ema_model, smoothing)
        actual = by_name(ema_model)
        for name, want in expected.items():
            torch.testing.assert_close(actual[name].detach(), want, msg=name)


def test_a_step_of_a_plain_copy_is_exact() -> None:
    """smoothing 0 copies and 1 keeps, through the kept plan too."""
    model, ema_model = pair()
    ef.compute_ema(model, ema_model, 0.3)
    before = {n: t.clone() for n, t in by_name(ema_model).items()}
    ef.compute_ema(model, ema_model, 1.0)
    assert all(torch.equal(t, before[n]) for n, t in by_name(ema_model).items())
    ef.compute_ema(model, ema_model, 0.0)
    assert all(torch.equal(t, by_name(model)[n]) for n, t in by_name(ema_model).items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("side", ["model", "ema_model"])
def test_a_device_move_between_calls_is_followed(side: str) -> None:
    model, ema_model = pair()
    step_and_check(model, ema_model)
    (model if side == "model" else ema_model).fc1.cuda()  # parameters only: the Parameter objects stay
    for k in range(2):
        expected = naive_step(model, ema_model)
        ef.compute_ema(model, ema_model, S)
        for name, t in by_name(ema_model).items():
            torch.testing.assert_close(t.detach().cpu(), expected[name].cpu(), msg=f"{name} step {k}")


def test_copies_of_a_model_pair_independently() -> None:
    model, ema_model = pair()
    other = copy.deepcopy(ema_model)
    step_and_check(model, ema_model)
    step_and_check(model, other, seed=4)
    step_and_check(model, ema_model, seed=8)


# ------------------------------------------------------------------ the EMA's path: FlatStorage.blend(reader)
MODEL_CHANGES = [
    replace_parameter,
    data_same_dtype,
    data_new_dtype,
    data_of_a_buffer,
    model_to_dtype,
    parameters_only_to_dtype,
    to_with_overwrite,
    to_with_swap,
    swap_tensors,
    buffer_dict_entry,
    load_state_dict_assign,
]


@pytest.mark.parametrize("change", MODEL_CHANGES)
def test_storage_blend_with_a_reader_follows_changes(change: Callable[[nn.Module, nn.Module], None]) -> None:
    """What EMA.update does on a model as it is: a reader of the live tensors, the plan kept between calls."""
    from emakit.engine.storage import FlatStorage

    model = make_model(0)
    names = list(by_name(model))
    slots = tensor_slots(model, names)

    def read() -> list[torch.Tensor]:
        return [table[key] for table, key in slots]

    storage = FlatStorage(dict(zip(names, read(), strict=True)))
    held = [*model.parameters(), *model.buffers()]

    def step(seed: int) -> None:
        perturb(model, seed)
        before = {n: t.double() if t.is_floating_point() else t.clone() for n, t in storage.tensors.items()}
        storage.blend(read, 1 - S)
        for name, src in zip(names, read(), strict=True):
            got = storage.tensors[name]
            if got.is_floating_point():
                want = S * before[name] + (1 - S) * src.detach().to(got.dtype).double()
                torch.testing.assert_close(got, want.to(got.dtype), msg=name)
            else:
                assert torch.equal(got, src), name

    step(0)
    plan = storage._plan
    step(1)
    assert storage._plan is plan  # nothing changed: kept
    change(model, model)
    step(2)
    step(3)
    del held


# ------------------------------------------------------------------ a tensor re-pointed far into a long group
def wide(seed: int) -> nn.Module:
    """Enough tensors that one group runs as several checked chunks (see UpdatePlan.run_checked)."""
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(3, 2) for _ in range(150)], nn.BatchNorm1d(2))


@pytest.mark.parametrize(
    "repoint",
    [
        lambda m: setattr(m[140].weight, "data", m[140].weight.data.double()),  # dtype: the late pairs regroup
        lambda m: setattr(m[140].weight, "data", torch.full_like(m[140].weight, 9.0)),  # new memory, same kind
        lambda m: setattr(m[150].running_mean, "data", m[150].running_mean.data.double()),
        lambda m: m[120:].to(torch.float64),
    ],
    ids=["late-dtype", "late-same-kind", "buffer-dtype", "tail-to-float64"],
)
@pytest.mark.parametrize("side", ["model", "ema_model"])
def test_a_tensor_re_pointed_late_in_a_long_group_is_updated_exactly_once(
    repoint: Callable[[nn.Module], None], side: str
) -> None:
    assert _CHUNK_PAIRS < 150
    model, ema_model = wide(0), wide(1)
    step_and_check(model, ema_model)
    repoint(model if side == "model" else ema_model)
    step_and_check(model, ema_model, steps=3, seed=7)


def test_a_shape_changed_late_in_a_long_group_is_an_error() -> None:
    model, ema_model = wide(0), wide(1)
    step_and_check(model, ema_model)
    model[140].weight.data = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"tensor '140\.weight' has shape \(2, 5\) in model and \(2, 3\) in ema_model"):
        ef.compute_ema(model, ema_model, S)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_storage_blend_follows_a_tensor_re_pointed_late_in_a_long_group(dtype: torch.dtype) -> None:
    from emakit.engine.storage import FlatStorage

    model = wide(0)
    names = list(by_name(model))
    slots = tensor_slots(model, names)

    def read() -> list[torch.Tensor]:
        return [table[key] for table, key in slots]

    storage = FlatStorage(dict(zip(names, read(), strict=True)))
    for step in range(4):
        if step == 2:
            model[140].weight.data = model[140].weight.data.to(dtype)
        perturb(model, step)
        before = {n: t.double() if t.is_floating_point() else t.clone() for n, t in storage.tensors.items()}
        storage.blend(read, 1 - S)
        for name, src in zip(names, read(), strict=True):
            got = storage.tensors[name]
            if got.is_floating_point():
                want = S * before[name] + (1 - S) * src.detach().to(got.dtype).double()
                torch.testing.assert_close(got, want.to(got.dtype), msg=f"{name} at step {step}")
            else:
                assert torch.equal(got, src), name


def test_a_flat_plan_made_again_is_kept_again() -> None:
    """A flat plan made again must count the buffers' references without the plan it replaces, or it is never
    current again and every update pairs anew (a view of the buffer taken elsewhere makes it re-pair once)."""
    from emakit.engine.flatten import flatten_model_
    from emakit.engine.storage import FlatStorage

    model, ema_model = pair()
    flat = flatten_model_(model)
    flatten_model_(ema_model)
    names = list(by_name(model))
    slots = tensor_slots(model, names)

    def read() -> list[torch.Tensor]:
        return [table[key] for table, key in slots]

    storage = FlatStorage(dict(zip(names, read(), strict=True)))
    storage.blend(read, 0.5)
    ef.compute_ema(model, ema_model, S)
    views = [b.view(-1)[:1] for b in flat.values()]  # new references to the model's buffers
    plans = []
    for _ in range(3):
        storage.blend(read, 0.5)
        step_and_check(model, ema_model, steps=1)
        plans.append((storage._plan, kept_plan(model, ema_model)))
    assert plans[1][0] is plans[2][0] and plans[1][1] is plans[2][1]
    assert plans[2][0] is not None and plans[2][0].reusable
    del views
