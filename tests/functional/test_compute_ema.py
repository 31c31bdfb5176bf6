"""compute_ema against closed forms and a naive per-tensor reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import emakit
import emakit.functional as ef
from conftest import TinyNet, make_model
from emakit.engine.naming import canonical_name


def naive_ema(model: nn.Module, ema_model: nn.Module, smoothing: float) -> None:
    """Reference: per tensor, by name, float blended and integer copied (the documented semantics)."""
    src = dict(model.named_parameters()) | dict(model.named_buffers())
    dst = dict(ema_model.named_parameters()) | dict(ema_model.named_buffers())
    with torch.no_grad():
        for name, s in src.items():
            d = dst[name]
            if d.is_floating_point():
                d.copy_(smoothing * d + (1 - smoothing) * s.to(d.dtype))
            else:
                d.copy_(s)


def perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g).to(t.dtype))
            else:
                t.add_(3)


def test_constant_model_matches_closed_form() -> None:
    model = make_model(0)
    ema_model = make_model(1)
    e0 = {n: t.clone() for n, t in ema_model.state_dict().items()}
    p = model.state_dict()
    s, k = 0.9, 7
    for _ in range(k):
        ef.compute_ema(model, ema_model, smoothing=s)
    for name, value in ema_model.state_dict().items():
        if value.is_floating_point():
            expected = p[name] + s**k * (e0[name] - p[name])
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(value, p[name]), name


def test_matches_naive_reference_over_many_steps() -> None:
    model, ema_model = make_model(0), make_model(1)
    reference = copy.deepcopy(ema_model)
    for step in range(5):
        perturb(model, step)
        ef.compute_ema(model, ema_model, smoothing=0.75)
        naive_ema(model, reference, 0.75)
    for (name, a), (_, b) in zip(ema_model.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_integer_buffers_are_copied_not_averaged() -> None:
    model, ema_model = make_model(0), make_model(0)
    model.bn.num_batches_tracked.fill_(7)
    ef.compute_ema(model, ema_model, smoothing=0.99)
    assert ema_model.bn.num_batches_tracked.item() == 7
    assert ema_model.bn.num_batches_tracked.dtype == torch.int64


def test_bool_buffers_are_copied() -> None:
    class WithMask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mask", torch.zeros(5, dtype=torch.bool))

    a, b = WithMask(), WithMask()
    a.mask[2] = True
    ef.compute_ema(a, b, smoothing=0.5)
    assert b.mask.tolist() == [False, False, True, False, False]


@pytest.mark.parametrize("smoothing", [0.0, 1.0])
def test_endpoints_are_exact(smoothing: float) -> None:
    model, ema_model = make_model(0), make_model(1)
    before = copy.deepcopy(ema_model.state_dict())
    ef.compute_ema(model, ema_model, smoothing=smoothing)
    expected = model.state_dict() if smoothing == 0.0 else before
    for name, value in ema_model.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, expected[name]), name


def test_pairs_by_name_through_wrappers() -> None:
    """DataParallel adds 'module.', torch.compile adds '_orig_mod.': both sides still pair up."""
    model, ema_model = make_model(0), make_model(1)
    reference = copy.deepcopy(ema_model)
    wrapped = torch.compile(nn.DataParallel(model))
    assert any(n.startswith("_orig_mod.module.") for n, _ in wrapped.named_parameters())
    ef.compute_ema(wrapped, ema_model, smoothing=0.5)
    naive_ema(model, reference, 0.5)
    for name, value in ema_model.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[name], msg=name)
    # and the other way round: the EMA side wrapped
    ef.compute_ema(model, nn.DataParallel(ema_model), smoothing=0.5)


def test_pairs_by_name_not_by_position() -> None:
    """Two models with the same tensors registered in different orders must pair by name."""

    class AB(nn.Module):
        def __init__(self, order: str) -> None:
            super().__init__()
            for ch in order:
                setattr(self, ch, nn.Parameter(torch.full((3,), float(ord(ch)))))

    src, dst = AB("ab"), AB("ba")
    with torch.no_grad():
        dst.a.zero_()
        dst.b.zero_()
    ef.compute_ema(src, dst, smoothing=0.0)
    assert dst.a.tolist() == [float(ord("a"))] * 3
    assert dst.b.tolist() == [float(ord("b"))] * 3


def test_fp32_ema_of_bf16_model() -> None:
    model = make_model(0).to(torch.bfloat16)
    ema_model = make_model(0)  # fp32
    # The float buffers/params are bf16 in the model, fp32 in the EMA: the blend happens in fp32.
    reference = copy.deepcopy(ema_model)
    perturb(model, 1)
    ef.compute_ema(model, ema_model, smoothing=0.9)
    naive_ema(model, reference, 0.9)
    for name, value in ema_model.state_dict().items():
        assert value.dtype == reference.state_dict()[name].dtype
        torch.testing.assert_close(value, reference.state_dict()[name], rtol=1e-6, atol=1e-6, msg=name)


def test_low_precision_ema_stalls_but_fp32_ema_moves() -> None:
    """Why emakit keeps fp32 averages: at smoothing 0.9999 a bf16 EMA toward 1.0 stalls near 0.03."""
    target = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        target.weight.fill_(1.0)
    bf16_ema = nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    fp32_ema = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        bf16_ema.weight.zero_()
        fp32_ema.weight.zero_()
    bf16_target = copy.deepcopy(target).to(torch.bfloat16)
    for _ in range(3000):
        ef.compute_ema(bf16_target, bf16_ema, smoothing=0.9999)
        ef.compute_ema(target, fp32_ema, smoothing=0.9999)
    assert fp32_ema.weight.item() == pytest.approx(1 - 0.9999**3000, rel=1e-4)
    assert bf16_ema.weight.item() < 0.2 * (1 - 0.9999**3000)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), "0.9", None, True])
def test_rejects_bad_smoothing(bad: object) -> None:
    with pytest.raises(ValueError, match=r"smoothing must be a real number in \[0, 1\], got"):
        ef.compute_ema(make_model(0), make_model(1), smoothing=bad)  # type: ignore[arg-type]


def test_missing_tensor_is_named() -> None:
    with pytest.raises(ValueError, match=r"tensor 'fc1.weight' is in model but missing from ema_model"):
        ef.compute_ema(make_model(0), nn.Sequential(nn.Linear(4, 8)), smoothing=0.5)
    superset = make_model(0)
    superset.add_module("extra", nn.Linear(1, 1))
    with pytest.raises(ValueError, match=r"tensor 'extra.weight' is in ema_model but missing from model"):
        ef.compute_ema(make_model(0), superset, smoothing=0.5)


def test_shape_mismatch_is_named() -> None:
    with pytest.raises(ValueError, match=r"tensor 'fc1.weight' has shape \(8, 4\) in model and \(8, 5\) in ema_model"):
        ef.compute_ema(TinyNet(d_in=4), TinyNet(d_in=5), smoothing=0.5)


def test_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        ef.compute_ema({"a": torch.zeros(1)}, make_model(0), 0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"ema_model must be a torch\.nn\.Module"):
        ef.compute_ema(make_model(0), [torch.zeros(1)], 0.5)  # type: ignore[arg-type]


def test_float_paired_with_integer_is_an_error() -> None:
    a, b = make_model(0), make_model(0)
    b.bn.num_batches_tracked = torch.zeros((), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"'bn.num_batches_tracked' is torch.int64 in model and torch.float32"):
        ef.compute_ema(a, b, 0.5)


def test_top_level_reexport() -> None:
    assert emakit.compute_ema is ef.compute_ema


def test_canonical_name_strips_wrappers() -> None:
    assert canonical_name("module._orig_mod.fc.weight") == "fc.weight"
    assert canonical_name("_orig_mod.module.fc.weight") == "fc.weight"
    assert canonical_name("a._fsdp_wrapped_module.b._checkpoint_wrapped_module.w") == "a.b.w"
    assert canonical_name("encoder.module.weight") == "encoder.module.weight"


@settings(max_examples=60, deadline=None)
@given(
    smoothing=st.floats(min_value=0.0, max_value=1.0),
    shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=6),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_property_matches_formula(smoothing: float, shapes: list[tuple[int, int]], steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)

    def build() -> nn.ParameterList:
        return nn.ParameterList([nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes])

    model, ema_model = build(), build()
    expected = [p.detach().clone() for p in ema_model]
    for _ in range(steps):
        ef.compute_ema(model, ema_model, smoothing)
        expected = [smoothing * e + (1 - smoothing) * p.detach() for e, p in zip(expected, model, strict=True)]
    for got, want in zip(ema_model, expected, strict=True):
        assert torch.allclose(got.detach(), want, rtol=1e-12, atol=1e-12)
        assert not math.isnan(float(got.detach().sum()))
