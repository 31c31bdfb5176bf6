"""A hand training loop that records the training weights after every step, and float64 oracles over them.

The oracles read only the recorded weights and the rule's published formula: they share no code with emakit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from emakit.averaging import Averager

#: One recorded step: the tracked floating tensors (float64) by name.
Weights = dict[str, torch.Tensor]


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def record(model: nn.Module) -> Weights:
    return {name: p.detach().to(torch.float64).clone() for name, p in model.named_parameters()}


def train(
    averager: Averager,
    steps: int,
    *,
    batches: Sequence[int] | None = None,
    tokens: Sequence[int] | None = None,
    seed: int = 0,
    model: nn.Module | None = None,
    start: int = 0,
) -> tuple[nn.Module, list[Weights]]:
    """SGD on a fixed regression task for ``steps`` steps (``start`` steps already done), the averager stepped
    after each one; returns the model and the weights after each step (index 0: before training)."""
    model = tiny_model(seed) if model is None else model
    if averager._tracked.model is None:
        averager.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    recorded = [record(model)]
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + step)
        n = batches[step] if batches is not None else 8
        x = torch.randn(n, 4, generator=g)
        loss = (model(x) - x[:, :3].sin()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        averager.step(num_samples=n, num_tokens=tokens[step] if tokens is not None else 0)
        recorded.append(record(model))
    return model, recorded


def ema_oracle(recorded: Sequence[Weights], weights: Callable[[int], float], first: int = 1, every: int = 1) -> Weights:
    """The average that starts as a copy at step ``first`` and blends every ``every`` steps after it, with
    ``weights(n)`` the weight of the training weights at the blend that brings it to ``n`` models."""
    average = {k: v.clone() for k, v in recorded[first].items()}
    n = 1
    for step in range(first + 1, len(recorded)):
        if step % every == 0:
            n += 1
            w = weights(n)
            average = {k: (1 - w) * average[k] + w * recorded[step][k] for k in average}
    return average


def max_error(actual: dict[str, torch.Tensor], expected: Weights) -> float:
    return max((actual[k].to(torch.float64) - expected[k]).abs().max().item() for k in expected)


def torchtitan_decay(half_life_fraction: float, num_updates: int) -> float:
    """torchtitan's published rule: ``decay = 2 ** (-1 / (half_life_fraction * num_updates))``."""
    return 2.0 ** (-1.0 / (half_life_fraction * num_updates))


def ln2() -> float:
    return math.log(2.0)


def bema_oracle(
    recorded: Sequence[Weights], rho: float, gamma: float, kappa: float, eta: float, start: int, every: int
) -> list[tuple[Weights, Weights, float] | None]:
    """BEMA (Block & Zhang 2025), the paper's recursion over recorded weights: after each step, (EMA, theta_0,
    alpha), or None before the start."""
    out: list[tuple[Weights, Weights, float] | None] = [None] * len(recorded)
    theta_0 = {k: v.clone() for k, v in recorded[start].items()}
    ema = {k: v.clone() for k, v in theta_0.items()}
    alpha, t = rho**-eta, 0
    out[start] = (ema, theta_0, alpha)
    for step in range(start + 1, len(recorded)):
        if step % every == 0:
            t += every
            beta = (rho + gamma * t) ** -kappa
            ema = {k: (1 - beta) * ema[k] + beta * recorded[step][k] for k in ema}
            alpha = (rho + gamma * t) ** -eta
        out[step] = (ema, theta_0, alpha)
    return out


def corrected(state: tuple[Weights, Weights, float] | None, now: Weights) -> Weights:
    """BEMA's evaluated weights ``alpha (theta_now - theta_0) + EMA``."""
    assert state is not None, "BEMA has not started at that step"
    ema, theta_0, alpha = state
    return {k: alpha * (now[k] - theta_0[k]) + ema[k] for k in ema}
