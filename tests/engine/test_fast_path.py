"""The fast update path (flat buffers, cached update plans) against a plain per-tensor reference."""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import emakit.functional as ef
from emakit import EMA
from emakit.engine import kernels
from emakit.engine.flatten import flatten_model_, is_flattened
from emakit.engine.pairing import kept_plan
from emakit.engine.plan import UpdatePlan
from emakit.engine.storage import ALIGN_ELEMENTS, FlatStorage

SMOOTHING = 0.9


class ConvNet(nn.Module):
    """Conv -> BatchNorm -> Linear: parameters, float buffers and an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def make_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet().to(dtype)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(6, 3, 4, 4, generator=g).to(dtype)
    y = torch.randint(0, 5, (6,), generator=g)
    model.train()
    nn.functional.cross_entropy(model(x).float(), y).backward()
    opt.step()
    opt.zero_grad()


def tracked(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the EMA tracks: trainable parameters and all buffers, by name."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return params | dict(model.named_buffers())


class Reference:
    """The plain per-tensor EMA: ``e <- s * e + (1 - s) * p`` in the EMA's dtype, integers copied."""

    def __init__(self, model: nn.Module, fp32: bool = True) -> None:
        self.values = {
            n: t.detach().clone().float() if fp32 and t.is_floating_point() else t.detach().clone()
            for n, t in tracked(model).items()
        }

    def update(self, model: nn.Module, smoothing: float = SMOOTHING) -> None:
        for name, src in tracked(model).items():
            e = self.values[name]
            if e.is_floating_point():
                self.values[name] = smoothing * e + (1 - smoothing) * src.detach().to(e.dtype)
            else:
                self.values[name] = src.detach().clone()

    def assert_matches(self, tensors: dict[str, torch.Tensor]) -> None:
        assert set(tensors) == set(self.values)
        for name, expected in self.values.items():
            if expected.is_floating_point():
                torch.testing.assert_close(tensors[name], expected, msg=name)
            else:
                assert torch.equal(tensors[name], expected), name


def train_alongside(
    model: nn.Module, opt: torch.optim.Optimizer, ema: EMA, reference: nn.Module, reference_opt: torch.optim.Optimizer
) -> Reference:
    """Three identical training steps on ``model`` (followed by ``ema``) and on a plain ``reference`` model
    (followed by the per-tensor :class:`Reference` EMA, which is returned)."""
    ema_ref = Reference(reference)
    for step in range(3):
        train_step(model, opt, step)
        train_step(reference, reference_opt, step)
        ema.update()
        ema_ref.update(reference)
    return ema_ref


def started_ema(model: nn.Module, **kwargs: object) -> EMA:
    ema = EMA(smoothing=SMOOTHING, **kwargs)  # type: ignore[arg-type]
    ema.attach(model)
    ema._initialise(0)
    return ema


def plan_of(ema: EMA) -> UpdatePlan | None:
    assert ema.storage is not None
    return ema.storage._plan


# ------------------------------------------------------------------ flatten_model_
def test_flatten_keeps_parameter_identity_values_and_training() -> None:
    model, reference = make_net(0), make_net(0)
    params_before = list(model.parameters())
    buffers = flatten_model_(model)
    assert list(model.parameters()) == params_before and all(
        a is b for a, b in zip(model.parameters(), params_before, strict=True)
    )
    assert is_flattened(model)
    for (name, t), ref in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(t, ref), name
    cpu = torch.device("cpu")
    assert set(buffers) == {(cpu, torch.float32, False), (cpu, torch.int64, False)}
    flat = buffers[(cpu, torch.float32, False)]
    for p in model.parameters():
        assert p.is_leaf and p.requires_grad
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        assert p.storage_offset() % ALIGN_ELEMENTS == 0
    # trains exactly like the unflattened model
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        train_step(model, opt_a, step)
        train_step(reference, opt_b, step)
    for (name, t), ref in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(t, ref, msg=name)
    assert is_flattened(model)


def test_flatten_separates_frozen_parameters_and_keeps_ties_and_channels_last() -> None:
    model = make_net(0).to(memory_format=torch.channels_last)
    model.fc.bias.requires_grad_(False)
    model.tied = nn.Linear(5, 5, bias=False)
    model.also_tied = model.tied  # the same module twice: its weight must stay one tensor
    buffers = flatten_model_(model)
    cpu = torch.device("cpu")
    assert (cpu, torch.float32, True) in buffers
    frozen = buffers[(cpu, torch.float32, True)]
    assert model.fc.bias.untyped_storage().data_ptr() == frozen.untyped_storage().data_ptr()
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.tied.weight is model.also_tied.weight
    assert is_flattened(model)


def test_flatten_leaves_aliased_tensors_alone() -> None:
    model = nn.Linear(4, 4)
    model.register_buffer("weight_view", model.weight.data[0])  # shares the weight's memory
    flatten_model_(model)
    with torch.no_grad():
        model.weight[0, 0] = 42.0
    assert model.weight_view[0] == 42.0


def test_flatten_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got list"):
        flatten_model_([])  # type: ignore[arg-type]


# ------------------------------------------------------------------ storage layout
def test_storage_mirrors_a_flattened_model_including_an_fp32_ema_of_bf16() -> None:
    model = make_net(0, torch.bfloat16)
    flatten_model_(model)
    storage = FlatStorage(tracked(model), fp32_ema=True)
    ref_base = model.conv.weight.storage_offset()
    ema_base = storage.tensors["conv.weight"].storage_offset()
    for name, t in tracked(model).items():
        if t.is_floating_point():
            assert storage.tensors[name].dtype == torch.float32
            assert storage.tensors[name].storage_offset() - ema_base == t.storage_offset() - ref_base, name


def test_packed_layout_matches_a_model_flattened_later() -> None:
    model = make_net(0)
    ema = started_ema(model)
    flatten_model_(model)  # after the storage exists: same packing rule, same offsets
    reference = Reference(model)
    reference.values = {n: t.clone() for n, t in ema.ema_tensors.items()}
    ema.update()
    reference.update(model)
    reference.assert_matches(ema.ema_tensors)
    plan = plan_of(ema)
    assert plan is not None and not plan.loose and len(plan.flat) == 2


# ------------------------------------------------------------------ the EMA algorithm on a flattened model
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=0.01),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, foreach=False),
    ],
    ids=["sgd-momentum", "adam", "adamw-loop"],
)
def test_flat_update_matches_reference_through_optimizer_steps_and_load_state_dict(
    make_opt: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
) -> None:
    model = make_net(0)
    other = make_net(7).state_dict()  # built first: any module construction makes cached plans re-pair once
    opt = make_opt(list(model.parameters()))  # built before flattening: it keeps working
    ema = started_ema(model, flatten_model=True)
    reference = Reference(model)
    ema.update()
    reference.update(model)
    plan = plan_of(ema)
    assert plan is not None and not plan.loose and [g.averaged for g in plan.flat] == [True, False]
    for step in range(4):
        train_step(model, opt, step)
        ema.update()
        reference.update(model)
        assert plan_of(ema) is plan  # the same plan, reused: no re-pairing per update
    model.load_state_dict(other)  # copies into the views
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert is_flattened(model)
    train_step(model, opt, 99)
    ema.update()
    reference.update(model)
    assert plan_of(ema) is plan
    reference.assert_matches(ema.ema_tensors)
    assert ema.ema_tensors["bn.num_batches_tracked"].item() == model.bn.num_batches_tracked.item()


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16])
def test_fp32_ema_of_low_precision_model_is_one_flat_group_and_exact(model_dtype: torch.dtype) -> None:
    model = make_net(0, model_dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = started_ema(model, flatten_model=True)
    expected = {n: t.clone() for n, t in ema.ema_tensors.items()}
    for step in range(3):
        train_step(model, opt, step)
        ema.update()
        for name, src in tracked(model).items():
            e = expected[name]
            expected[name] = e.lerp(src.detach().float(), 1 - SMOOTHING) if e.is_floating_point() else src.clone()
    plan = plan_of(ema)
    assert plan is not None and not plan.loose
    assert any(not g.same for g in plan.flat)  # the cast path ran
    for name, value in ema.ema_tensors.items():
        assert value.dtype == (torch.float32 if value.is_floating_point() else torch.int64)
        torch.testing.assert_close(value, expected[name], msg=name)


def test_mixed_dtypes_unflattened_use_the_batched_cast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_chunk_elements", lambda device: 20)  # several batches and a chunked large tensor
    torch.manual_seed(0)
    sources = [torch.randn(s).to(torch.bfloat16) for s in [(3,), (50,), (4, 5), (7,), (2, 3, 4), (1,)]]
    sources.append(torch.randn(6, 4).to(torch.float16).t())  # non-contiguous
    targets = [torch.randn(s.shape) for s in sources]
    expected = [t.lerp(s.float(), 0.3) for t, s in zip(targets, sources, strict=True)]
    kernels.lerp_tensors_(targets, sources, 0.3)
    for got, want in zip(targets, expected, strict=True):
        torch.testing.assert_close(got, want)


# ------------------------------------------------------------------ falling back when views break
def _break_by_to(model: nn.Module) -> None:
    model.to(torch.float64)


def _break_by_new_parameter(model: nn.Module) -> None:
    model.fc.weight = nn.Parameter(torch.full_like(model.fc.weight, 3.0))


def _break_by_data(model: nn.Module) -> None:
    model.conv.bias.data = torch.full_like(model.conv.bias, -2.0)


def _break_by_buffer_dict(model: nn.Module) -> None:
    model.bn._buffers["running_var"] = torch.full_like(model.bn.running_var, 5.0)


def _break_by_overwrite_on_conversion(model: nn.Module) -> None:
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.to(torch.float64)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)


def _break_by_swap_tensors(model: nn.Module) -> None:
    torch.utils.swap_tensors(model.fc.bias, nn.Parameter(torch.full_like(model.fc.bias, 4.0)))


@pytest.mark.parametrize(
    "breaker",
    [
        _break_by_to,
        _break_by_new_parameter,
        _break_by_data,
        _break_by_buffer_dict,
        _break_by_overwrite_on_conversion,
        _break_by_swap_tensors,
    ],
)
def test_broken_views_fall_back_to_the_live_tensors(breaker: Callable[[nn.Module], None]) -> None:
    model = make_net(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = started_ema(model, flatten_model=True)
    reference = Reference(model)
    ema.update()
    reference.update(model)
    held = list(model.parameters())  # e.g. an optimizer keeps the old parameters alive
    breaker(model)
    ema.update()
    reference.update(model)
    reference.assert_matches(ema.ema_tensors)
    train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), 5)
    ema.update()
    reference.update(model)
    reference.assert_matches(ema.ema_tensors)
    del held, opt


def test_unflattened_model_reuses_its_plan_and_notices_replacements() -> None:
    model = make_net(0)
    ema = started_ema(model)
    reference = Reference(model)
    ema.update()
    reference.update(model)
    plan = plan_of(ema)
    assert plan is not None and plan.loose  # separate tensors: the grouped path
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, opt, 0)
    ema.update()
    reference.update(model)
    assert plan_of(ema) is plan  # checked against the live tensors, not paired again
    for breaker in (_break_by_data, _break_by_buffer_dict, _break_by_swap_tensors, _break_by_to):
        breaker(model)
        ema.update()
        reference.update(model)
        reference.assert_matches(ema.ema_tensors)
    assert plan_of(ema) is not plan


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_parameters_converted_in_place_are_regrouped(dtype: torch.dtype) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # no buffers: only the parameters change
    ema = started_ema(model)
    reference = Reference(model)
    ema.update()
    ema.update()
    reference.update(model)
    reference.update(model)
    model.to(dtype)  # same Parameter objects, new dtype and memory
    ema.update()
    reference.update(model)
    reference.assert_matches(ema.ema_tensors)


def test_replaced_parameter_is_followed_without_reattaching() -> None:
    model = make_net(0)
    ema = started_ema(model, flatten_model=True)
    ema.update()
    plan = plan_of(ema)
    model.fc.weight = nn.Parameter(torch.full_like(model.fc.weight, 3.0))  # the registration hook notices
    assert plan is not None and not plan.is_current()
    before = ema.ema_tensors["fc.weight"].clone()
    ema.update()
    torch.testing.assert_close(ema.ema_tensors["fc.weight"], SMOOTHING * before + (1 - SMOOTHING) * 3.0)


def test_reflattening_after_a_move_restores_the_fast_path() -> None:
    model = make_net(0)
    ema = started_ema(model, flatten_model=True)
    ema.update()
    model.to(torch.float64)
    ema.update()
    assert plan_of(ema) is None or plan_of(ema).loose  # type: ignore[union-attr]
    model.to(torch.float32)
    flatten_model_(model)
    ema.update()
    plan = plan_of(ema)
    assert plan is not None and not plan.loose


# ------------------------------------------------------------------ compute_ema
def test_compute_ema_on_flattened_models_matches_reference_and_reuses_its_plan() -> None:
    model, ema_model = make_net(0), make_net(1)
    flatten_model_(model)
    flatten_model_(ema_model)
    reference = Reference(ema_model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    plans = []
    for step in range(3):
        train_step(model, opt, step)
        ef.compute_ema(model, ema_model, SMOOTHING)
        reference.update(model)
        plans.append(kept_plan(model, ema_model))
    assert plans[0] is plans[1] is plans[2] and not plans[0].loose
    reference.assert_matches(tracked(ema_model))


def test_compute_ema_cache_notices_structure_changes() -> None:
    model, ema_model = make_net(0), make_net(1)
    flatten_model_(model)
    flatten_model_(ema_model)
    ef.compute_ema(model, ema_model, SMOOTHING)
    model.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"'extra\.weight' is in model but missing from ema_model"):
        ef.compute_ema(model, ema_model, SMOOTHING)
    del model.extra
    ef.compute_ema(model, ema_model, SMOOTHING)
    del ema_model.fc.bias  # no registration hook fires for a deletion; the table sizes change
    with pytest.raises(ValueError, match=r"'fc\.bias' is in model but missing from ema_model"):
        ef.compute_ema(model, ema_model, SMOOTHING)


def test_compute_ema_with_frozen_parameters_in_their_own_buffer() -> None:
    model, ema_model = make_net(0), make_net(1)
    for m in (model, ema_model):
        m.conv.weight.requires_grad_(False)
        flatten_model_(m)
    reference = Reference(ema_model)
    reference.values = {n: t.detach().clone() for n, t in ema_model.state_dict().items()}
    ef.compute_ema(model, ema_model, SMOOTHING)
    for name, src in model.state_dict().items():
        e = reference.values[name]
        reference.values[name] = SMOOTHING * e + (1 - SMOOTHING) * src if e.is_floating_point() else src.clone()
    plan = kept_plan(model, ema_model)
    assert plan is not None and plan.reusable
    for name, value in ema_model.state_dict().items():
        torch.testing.assert_close(value, reference.values[name], msg=name)


def test_flat_span_never_writes_into_unpaired_tensors() -> None:
    # ema_model flattened with its fp32 tensors in one buffer, but the model has one tensor in fp64:
    # the fp32 pairs do not cover the whole buffer, so no span may overwrite the fp64-paired tensor.
    model, ema_model = make_net(0), make_net(1)
    flatten_model_(ema_model)
    model.bn.running_mean.data = model.bn.running_mean.double()
    flatten_model_(model)
    expected = {n: t.detach().clone() for n, t in ema_model.state_dict().items()}
    src = model.state_dict()
    ef.compute_ema(model, ema_model, SMOOTHING)
    for name, e in expected.items():
        want = SMOOTHING * e + (1 - SMOOTHING) * src[name].to(e.dtype) if e.is_floating_point() else src[name]
        torch.testing.assert_close(ema_model.state_dict()[name], want, msg=name)


# ------------------------------------------------------------------ properties
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64]
EPS = {torch.float32: 2**-23, torch.float64: 2**-52, torch.bfloat16: 2**-8, torch.float16: 2**-10}


@st.composite
def tensor_specs(draw: st.DrawFn) -> list[tuple[tuple[int, ...], torch.dtype, bool]]:
    """(shape, dtype, frozen) for 1 to 8 tensors, zero-size ones included."""
    n = draw(st.integers(1, 8))
    return [
        (
            tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))),
            draw(st.sampled_from(DTYPES)),
            draw(st.booleans()),
        )
        for _ in range(n)
    ]


def build(specs: list[tuple[tuple[int, ...], torch.dtype, bool]], seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    module = nn.Module()
    for i, (shape, dtype, frozen) in enumerate(specs):
        if dtype.is_floating_point:
            value = torch.randn(shape, generator=g).to(dtype)
            module.register_parameter(f"p{i}", nn.Parameter(value, requires_grad=not frozen))
        else:
            module.register_buffer(f"b{i}", torch.randint(-100, 100, shape, generator=g))
    return module


def perturb(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g).to(t.dtype))
            else:
                t.add_(torch.randint(-5, 5, t.shape, generator=g))


@settings(max_examples=60, deadline=None)
@given(
    specs=tensor_specs(),
    smoothing=st.floats(0.0, 1.0),
    flatten=st.booleans(),
    fp32_ema=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_storage_blend_matches_the_naive_formula(
    specs: list[tuple[tuple[int, ...], torch.dtype, bool]], smoothing: float, flatten: bool, fp32_ema: bool, seed: int
) -> None:
    model = build(specs, seed)
    if flatten:
        flatten_model_(model)
    names = list(tracked(model))
    storage = FlatStorage(tracked(model), fp32_ema=fp32_ema)

    def read() -> list[torch.Tensor]:
        live = tracked(model)
        return [live[n] for n in names]

    for step in range(3):
        perturb(model, seed + step)
        before = {n: t.double().clone() if t.is_floating_point() else t.clone() for n, t in storage.tensors.items()}
        storage.blend(read, 1.0 - smoothing)
        for name, src in zip(names, read(), strict=True):
            value, e = storage.tensors[name], before[name]
            if value.is_floating_point():
                # the source as the EMA's dtype sees it, then one naive step in float64
                p = src.detach().to(value.dtype).double()
                want = smoothing * e + (1 - smoothing) * p
                scale = 1.0 + (float(torch.maximum(e.abs(), p.abs()).max()) if e.numel() else 0.0)
                torch.testing.assert_close(value.double(), want, rtol=0, atol=4 * EPS[value.dtype] * scale)
            else:
                assert torch.equal(value, src), name


@settings(max_examples=40, deadline=None)
@given(specs=tensor_specs(), smoothing=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_compute_ema_flattened_or_not_agrees(
    specs: list[tuple[tuple[int, ...], torch.dtype, bool]], smoothing: float, seed: int
) -> None:
    model, ema_a = build(specs, seed), build(specs, seed + 1)
    model_flat, ema_b = copy.deepcopy(model), copy.deepcopy(ema_a)
    flatten_model_(model_flat)
    flatten_model_(ema_b)
    for step in range(2):
        perturb(model, seed + step)
        perturb(model_flat, seed + step)
        ef.compute_ema(model, ema_a, smoothing)
        ef.compute_ema(model_flat, ema_b, smoothing)
    for (name, a), b in zip(ema_a.state_dict().items(), ema_b.state_dict().values(), strict=True):
        if a.is_floating_point():
            eps = EPS[a.dtype]
            torch.testing.assert_close(a, b, rtol=4 * eps, atol=4 * eps, msg=name)
        else:
            assert torch.equal(a, b), name


# ------------------------------------------------------------------ devices
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_tensors_are_grouped_apart() -> None:
    model = make_net(0)
    model.fc.cuda()
    ema = started_ema(model, flatten_model=True)
    reference = Reference(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        x = torch.randn(6, 3, 4, 4)
        loss = model.fc(torch.relu(model.bn(model.conv(x))).flatten(1).cuda()).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update()
        reference.update(model)
        del step
    for name, value in ema.ema_tensors.items():
        torch.testing.assert_close(value.cpu(), reference.values[name].cpu(), msg=name)
    assert {t.device.type for t in ema.ema_tensors.values()} == {"cpu", "cuda"}


# ------------------------------------------------------------------ wrappers
def test_flattened_model_under_torch_compile_trains_like_eager() -> None:
    model, reference = make_net(0), make_net(0)
    flatten_model_(model)
    compiled = torch.compile(model, backend="aot_eager")
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    ema = started_ema(compiled, flatten_model=True)
    ema_ref = train_alongside(compiled, opt_a, ema, reference, opt_b)
    assert is_flattened(model)
    ema_ref.assert_matches(ema.ema_tensors)


@pytest.mark.parametrize("flatten_first", [True, False], ids=["flatten-then-wrap", "wrap-then-flatten"])
def test_flattened_model_under_ddp_keeps_its_views(tmp_path: Path, flatten_first: bool) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)

    # the DDP objects are freed before the process group is destroyed: freed later, they can hang in teardown
    def run() -> None:
        model, reference = make_net(0), make_net(0)
        if flatten_first:
            flatten_model_(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt_a = torch.optim.Adam(ddp.parameters(), lr=0.01)
        opt_b = torch.optim.Adam(reference.parameters(), lr=0.01)
        ema = started_ema(ddp, flatten_model=not flatten_first)
        ema_ref = train_alongside(ddp, opt_a, ema, reference, opt_b)
        assert is_flattened(model)
        plan = plan_of(ema)
        assert plan is not None and not plan.loose
        ema_ref.assert_matches(ema.ema_tensors)

    try:
        run()
    finally:
        gc.collect()
        dist.destroy_process_group()


def test_trainer_with_flatten_model_matches_the_default_ema() -> None:
    from conftest import make_loader, make_model
    from emakit.trainer import Trainer

    results = []
    for flatten in (False, True):
        model = make_model(0)
        ema = EMA(half_life="5ba", flatten_model=flatten)
        trainer = Trainer(model, make_loader(), "2ep", algorithms=[ema], progress_bar=False, seed=0)
        trainer.fit()
        assert is_flattened(model) or not flatten
        results.append({n: t.clone() for n, t in ema.ema_tensors.items()})
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, msg=name)


def test_flatten_model_option_is_validated() -> None:
    with pytest.raises(TypeError, match="flatten_model must be a bool, got 'yes'"):
        EMA(flatten_model="yes")  # type: ignore[arg-type]


def test_resume_with_flatten_model_equals_uninterrupted_run(tmp_path: Path) -> None:
    from conftest import make_loader, make_model
    from emakit.trainer import Trainer

    def run(**kwargs: Any) -> tuple[nn.Module, EMA]:
        model = make_model(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        ema = EMA(half_life="2ba", flatten_model=True)
        trainer = Trainer(
            model, make_loader(n=32), "2ep", algorithms=[ema], optimizers=opt, progress_bar=False, **kwargs
        )
        trainer.fit()
        return model, ema

    full, full_ema = run(save_folder=tmp_path, save_interval="3ba")
    resumed, resumed_ema = run(load_path=tmp_path / "ep1-ba6.pt")  # mid-epoch, EMA started
    assert is_flattened(resumed)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for name, value in full_ema.ema_tensors.items():
        assert torch.equal(resumed_ema.ema_tensors[name], value), name
