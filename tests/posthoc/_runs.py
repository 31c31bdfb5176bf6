"""The small runs the post-hoc tests record snapshots of: a probe whose weights after update k are the unit vector
e_k (so that an average of it is the weight it gives each update), and a tiny MLP trained by noisy SGD."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def probe(updates: int) -> tuple[nn.Module, Callable[[int], None]]:
    """A model of one parameter of ``updates`` entries and ``step(k)``, which sets it to e_k (k from 1)."""
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(updates))

    def step(k: int) -> None:
        with torch.no_grad():
            model.w.zero_()
            model.w[k - 1] = 1.0

    return model, step


def noisy_mlp() -> tuple[nn.Module, Callable[[int], None]]:
    """A tiny MLP (seeded) and ``step(k)``: one SGD step on a random batch of a fixed regression problem."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(256, 6)
    y = torch.sin(x @ torch.randn(6, 1))

    def step(k: int) -> None:
        batch = torch.randint(0, len(x), (8,))
        loss = nn.functional.mse_loss(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return model, step
