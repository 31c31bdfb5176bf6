"""Update plans keep the values where the average equals a non-finite source (lerp(-inf, -inf, w) is NaN) and blend
every other value as before; checked against the blend written out in float64."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from emakit.engine.plan import UpdatePlan

SPECIALS = [float("inf"), float("-inf"), float("nan")]


def with_specials(draw: st.DrawFn, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    avg, src = torch.randn(n, generator=g), torch.randn(n, generator=g)
    for i in draw(st.lists(st.integers(0, n - 1), max_size=n)):
        kind = draw(st.sampled_from(["same", "avg", "src", "both"]))
        value = draw(st.sampled_from(SPECIALS))
        if kind in ("same", "avg", "both"):
            avg[i] = value
        if kind in ("same", "src"):
            src[i] = value
        if kind == "both":
            src[i] = draw(st.sampled_from(SPECIALS))
    return avg, src


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 40), seed=st.integers(0, 2**16), weight=st.floats(0.01, 0.99))
def test_equal_values_stay_and_the_rest_blend_as_the_formula(
    data: st.DataObject, n: int, seed: int, weight: float
) -> None:
    avg, src = with_specials(data.draw, n, seed)
    plain = torch.randn(7)  # a finite pair beside it: the plain kernels
    targets, sources = [avg.clone(), plain.clone()], [src, plain * 2]
    UpdatePlan(targets, sources, [True, True]).run(weight)

    a, s = avg.double(), src.double()
    formula = a + weight * (s - a)  # in float64: -inf + w * (-inf - -inf) would be NaN, so equal pairs are apart
    equal = a == s
    got = targets[0].double()
    assert torch.equal(got[equal], a[equal])  # bitwise the value it had, infinities included
    finite = a.isfinite() & s.isfinite()
    torch.testing.assert_close(got[finite], formula[finite], rtol=1e-6, atol=1e-6)
    assert not got[~equal & ~finite].isfinite().any()  # a new NaN or Inf is blended in, not hidden
    torch.testing.assert_close(targets[1].double(), (plain + weight * (plain * 2 - plain)).double())


def test_a_bf16_source_of_an_fp32_average_keeps_its_infinities() -> None:
    src = torch.full((4, 4), float("-inf")).triu(1).bfloat16()
    avg = src.float()
    UpdatePlan([avg], [src], [True]).run(0.3)
    assert torch.equal(avg, src.float())
