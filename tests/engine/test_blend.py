"""blend_averages_ against k separate lerp_ calls, and the power schedule through it against the closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from emakit._compat import FOREACH_LERP_PER_TENSOR
from emakit.engine.blend import PreparedBlend, blend_averages_
from emakit.posthoc.profiles import PowerProfile, power_weights

FP32 = {"rtol": 1.2e-7, "atol": 1e-30}  # fp32 rounding: one ulp


def reference(averages: list[list[torch.Tensor]], sources: list[torch.Tensor], weights: list[float]) -> None:
    """k separate updates, one tensor at a time: the plain definition."""
    for average, weight in zip(averages, weights, strict=True):
        for target, source in zip(average, sources, strict=True):
            if not (source.is_floating_point() or source.is_complex()) or weight == 1.0:
                target.copy_(source)
            elif weight != 0.0:
                target.lerp_(source.to(target.dtype), weight)


def make(shapes: list[tuple[int, ...]], k: int, source_dtype: torch.dtype, seed: int = 0) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    sources = [torch.randn(s, generator=g).to(source_dtype) for s in shapes]
    averages = [[torch.randn(s, generator=g) for s in shapes] for _ in range(k)]
    return averages, sources


def assert_same(got: list[list[torch.Tensor]], expected: list[list[torch.Tensor]]) -> None:
    for j, (a, b) in enumerate(zip(got, expected, strict=True)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert x.dtype == y.dtype
            torch.testing.assert_close(x, y, **FP32, msg=lambda m, i=i, j=j: f"average {j}, tensor {i}: {m}")


@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shapes",
    [
        [(300_001,)],  # one flat buffer: many chunks and a partial last one
        [(100, 37), (5,), (), (16, 3, 3, 3), (5000,), (0,)] * 10,  # many tensors: batched, and chunked
    ],
    ids=["flat", "many"],
)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_equals_k_separate_lerps(source_dtype: torch.dtype, shapes: list[tuple[int, ...]], k: int) -> None:
    averages, sources = make(shapes, k, source_dtype)
    expected = [[t.clone() for t in a] for a in averages]
    weights = [0.001, 0.37, 0.9, 0.5][:k]
    blend_averages_(averages, sources, weights, chunk=4096)
    reference(expected, sources, weights)
    assert_same(averages, expected)


@pytest.mark.parametrize("chunk", [5, 4096, None])
def test_chunk_size_does_not_change_the_result(chunk: int | None) -> None:
    averages, sources = make([(10_000,), (33,), (7, 7)], 3, torch.bfloat16, seed=1)
    expected = [[t.clone() for t in a] for a in averages]
    blend_averages_(averages, sources, [0.1, 0.2, 0.3], chunk=chunk)
    reference(expected, sources, [0.1, 0.2, 0.3])
    assert_same(averages, expected)


def test_strided_tensors_and_averages_of_several_dtypes() -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(300, 200, generator=g, dtype=torch.bfloat16)
    sources = [base.t(), base[::2, ::3], torch.randn(50, generator=g, dtype=torch.bfloat16)]
    averages = [
        [torch.randn(s.shape, generator=g) for s in sources],  # fp32 averages of bf16 weights
        [torch.randn(s.shape, generator=g).to(torch.bfloat16) for s in sources],  # bf16 average
        [torch.randn(s.shape[::-1], generator=g).t() for s in sources[:2]] + [torch.randn(50, generator=g)],
    ]
    expected = [[t.clone() for t in a] for a in averages]
    blend_averages_(averages, sources, [0.25, 0.5, 0.125], chunk=1000)
    reference(expected, sources, [0.25, 0.5, 0.125])
    assert_same(averages, expected)


def test_integer_tensors_are_copied_into_every_average_whatever_the_weights() -> None:
    sources = [torch.randn(10), torch.tensor(17), torch.tensor([True, False])]
    averages = [[torch.zeros(10), torch.tensor(0), torch.tensor([False, True])] for _ in range(3)]
    blend_averages_(averages, sources, [0.0, 0.5, 1.0])
    for average in averages:
        assert average[1].item() == 17
        assert average[2].tolist() == [True, False]
    assert torch.equal(averages[0][0], torch.zeros(10))  # weight 0: unchanged
    torch.testing.assert_close(averages[1][0], sources[0] / 2)
    assert torch.equal(averages[2][0], sources[0])  # weight 1: a copy


def test_weight_one_copies_even_over_uninitialised_memory() -> None:
    # The first power-profile update (beta_1 = 0) may start from torch.empty: a lerp would keep NaN * 0 = NaN.
    sources = [torch.randn(100_000), torch.randn(3, 3)]
    averages = [[torch.full_like(s, math.nan) for s in sources] for _ in range(2)]
    blend_averages_(averages, sources, [1.0, 1.0], chunk=4096)
    for average in averages:
        for target, source in zip(average, sources, strict=True):
            assert torch.equal(target, source)


def test_power_schedule_through_the_kernel_gives_the_closed_form_weights() -> None:
    # Source at update t is the one-hot vector e_t: the averages then hold the weights of every update.
    n = 200
    profiles = [PowerProfile.from_sigma_rel(s) for s in (0.05, 0.10, 0.2)]
    averages = [[torch.empty(n, dtype=torch.float64)] for _ in profiles]
    for t in range(1, n + 1):
        one_hot = torch.zeros(n, dtype=torch.float64)
        one_hot[t - 1] = 1.0
        blend_averages_(averages, [one_hot], [1.0 - p.beta(t) for p in profiles])
    for average, profile in zip(averages, profiles, strict=True):
        np.testing.assert_allclose(average[0].numpy(), power_weights(n, profile.gamma), rtol=1e-9, atol=1e-15)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(0, 3000), min_size=1, max_size=8),
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
    st.integers(1, 5000),
    st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_property_equals_separate_lerps(sizes: list[int], weights: list[float], chunk: int, dtype: torch.dtype) -> None:
    averages, sources = make([(n,) for n in sizes], len(weights), dtype, seed=len(sizes))
    expected = [[t.clone() for t in a] for a in averages]
    blend_averages_(averages, sources, weights, chunk=chunk)
    reference(expected, sources, weights)
    assert_same(averages, expected)


def test_bad_input_names_the_argument() -> None:
    sources = [torch.randn(3), torch.randn(2)]
    good = [[torch.zeros(3), torch.zeros(2)]]
    with pytest.raises(ValueError, match=r"weights must have one entry per average \(1\), got 2"):
        blend_averages_(good, sources, [0.1, 0.2])
    with pytest.raises(ValueError, match=r"weights\[0\] must be a real number in \[0, 1\], got 1.5"):
        blend_averages_(good, sources, [1.5])
    with pytest.raises(ValueError, match=r"averages\[0\] must hold one tensor per source \(2 sources\), got 1"):
        blend_averages_([[torch.zeros(3)]], sources, [0.1])
    with pytest.raises(ValueError, match=r"averages\[0\]\[1\] has shape \(3,\), its source has \(2,\)"):
        blend_averages_([[torch.zeros(3), torch.zeros(3)]], sources, [0.1])
    with pytest.raises(ValueError, match=r"averages\[0\]\[1\] is torch.int64, its source is torch.float32"):
        blend_averages_([[torch.zeros(3), torch.zeros(2, dtype=torch.long)]], sources, [0.1])
    with pytest.raises(ValueError, match=r"chunk must be a positive integer number of elements, got 0"):
        blend_averages_(good, sources, [0.1], chunk=0)


def test_without_per_pair_weights_in_foreach_lerp(monkeypatch: pytest.MonkeyPatch) -> None:
    # Older torch has no _foreach_lerp_ with a list of weights: the per-average path must give the same result.
    import emakit.engine.blend as kernels

    monkeypatch.setattr(kernels, "_SCALAR_LIST", False)
    averages, sources = make([(50_000,), (30, 3), (7,)], 3, torch.float32, seed=3)
    expected = [[t.clone() for t in a] for a in averages]
    blend_averages_(averages, sources, [0.2, 1.0, 0.7], chunk=4096)
    reference(expected, sources, [0.2, 1.0, 0.7])
    assert_same(averages, expected)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    st.lists(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2), min_size=1, max_size=4),
    st.integers(1, 5000),
    st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_property_prepared_blend_equals_separate_lerps_update_after_update(
    sizes: list[int], rounds: list[list[float]], chunk: int, dtype: torch.dtype
) -> None:
    # The same prepared lists serve every update, whatever the weights (0 and 1 included) of each round.
    averages, sources = make([(n,) for n in sizes], 2, dtype, seed=len(sizes))
    averages[0].append(torch.zeros(3, dtype=torch.long))
    averages[1].append(torch.ones(3, dtype=torch.long))
    sources.append(torch.zeros(3, dtype=torch.long))
    expected = [[t.clone() for t in a] for a in averages]
    blend = PreparedBlend(averages, sources, chunk=chunk)
    for r, weights in enumerate(rounds):
        for s in sources:
            s.add_(r + 1)  # the same tensors, new values: what a training step does
        blend(weights)
        reference(expected, sources, weights)
        assert_same(averages, expected)


def test_prepared_blend_is_one_kernel_over_prepared_lists_for_same_dtype_tensors() -> None:
    averages, sources = make([(10_000,), (300,)], 3, torch.float32)
    fused = PreparedBlend(averages, sources, chunk=4096)
    assert fused.fused is FOREACH_LERP_PER_TENSOR  # older torch: per-average calls through blend_averages_
    mixed = PreparedBlend(make([(10,)], 2, torch.bfloat16)[0], make([(10,)], 2, torch.bfloat16)[1])
    assert not mixed.fused  # fp32 averages of bf16 weights: the cast goes through blend_averages_'s scratch
    with pytest.raises(ValueError, match=r"weights must have one entry per average \(3\), got 2"):
        fused([0.1, 0.2])
    with pytest.raises(ValueError, match=r"weights\[1\] must be a real number in \[0, 1\], got -0.5"):
        fused([0.1, -0.5, 0.2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_equals_k_separate_lerps(source_dtype: torch.dtype) -> None:
    averages, sources = make([(3_000_001,), (100, 37), (5,)], 3, source_dtype)
    averages = [[t.cuda() for t in a] for a in averages]
    sources = [t.cuda() for t in sources]
    expected = [[t.clone() for t in a] for a in averages]
    weights = [0.001, 0.37, 0.9]
    PreparedBlend(averages, sources)(weights)  # 2M-element chunks on CUDA: a full chunk and a partial one
    reference(expected, sources, weights)
    assert_same(averages, expected)
