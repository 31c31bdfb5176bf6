"""The tracked set has one owner, and the NaN/Inf guard's reference is keyed by name.

Two runs that never started before: the set was decided twice (the trainable parameters at attach, then the
selection) and the guard's attach-time reference was taken by position between the two decisions, so a
``-inf`` mask buffer was compared with another tensor and every update was skipped as "NaN/Inf". Each run here
is checked against a float64 EMA computed by hand from the weights recorded after every step.
"""

from __future__ import annotations

import torch
from torch import nn

from emakit import EMA


class Masked(nn.Module):
    """A frozen Linear registered before a ``-inf`` causal mask buffer, then a trainable Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.register_buffer("mask", torch.triu(torch.full((4, 4), float("-inf")), diagonal=1))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = (x @ self.frozen.weight.T).unsqueeze(-1) + self.mask.sum(0, keepdim=True).clamp(min=-1.0)
        return self.head(scores.mean(-1))


def run(model: nn.Module, ema: EMA, steps: int, unfreeze_at: int | None = None) -> list[dict[str, torch.Tensor]]:
    """SGD steps on fixed data, ``ema.step()`` after each; returns the weights after every step (float64)."""
    recorded = []
    for i in range(steps):
        if unfreeze_at is not None and i == unfreeze_at:
            model.frozen.requires_grad_(True)  # type: ignore[union-attr]
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(i))
        model(x).pow(2).mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
                    p.grad = None
        ema.step()
        recorded.append({n: t.detach().double().clone() for n, t in model.state_dict().items()})
    return recorded


def oracle(recorded: list[dict[str, torch.Tensor]], smoothing: float, start: int) -> dict[str, torch.Tensor]:
    """The float64 EMA of the recorded weights, starting as a copy at step index ``start``."""
    average = dict(recorded[start])
    for weights in recorded[start + 1 :]:
        average = {n: smoothing * average[n] + (1 - smoothing) * weights[n] for n in average}
    return average


def assert_matches(ema: EMA, expected: dict[str, torch.Tensor], names: set[str]) -> None:
    assert set(ema.ema_tensors) == names
    for name in names:
        got, want = ema.ema_tensors[name].double(), expected[name]
        finite = want.isfinite()
        assert torch.equal(got[~finite], want[~finite]), name  # the mask's -inf stays -inf
        assert torch.allclose(got[finite], want[finite], rtol=1e-6, atol=1e-7), name


def test_params_all_with_a_frozen_layer_before_an_inf_mask_starts_and_matches_the_oracle() -> None:
    torch.manual_seed(0)
    model = Masked()
    ema = EMA(smoothing=0.9, params="all", skip_nonfinite=True)
    ema.attach(model)
    recorded = run(model, ema, 12)
    assert ema.started and ema.num_skipped_nonfinite == 0 and ema.n_averaged == 12
    names = {"frozen.weight", "frozen.bias", "mask", "head.weight", "head.bias"}
    assert_matches(ema, oracle(recorded, 0.9, 0), names)


def test_a_layer_frozen_at_attach_and_unfrozen_before_the_start_is_averaged() -> None:
    """The usual fine-tuning pattern: the set is fixed when the average starts, not at attach."""
    torch.manual_seed(0)
    model = Masked()
    ema = EMA(smoothing=0.8, ema_start="3ba", skip_nonfinite=True)
    ema.attach(model)
    recorded = run(model, ema, 10, unfreeze_at=1)
    assert ema.started and ema.num_skipped_nonfinite == 0 and ema.n_averaged == 8
    names = {"frozen.weight", "frozen.bias", "mask", "head.weight", "head.bias"}
    assert_matches(ema, oracle(recorded, 0.8, 2), names)


def test_a_diverged_weight_is_still_skipped_when_the_set_changed_after_attach() -> None:
    """Keyed by name, the reference still tells a kept -inf mask from a weight that became NaN."""
    torch.manual_seed(0)
    model = Masked()
    ema = EMA(smoothing=0.8, params="all", skip_nonfinite=True)
    ema.attach(model)
    run(model, ema, 3)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    import pytest

    with pytest.warns(UserWarning, match="NaN or Inf"):
        ema.step()
    assert ema.num_skipped_nonfinite == 1 and ema.n_averaged == 3
