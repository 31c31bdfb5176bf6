"""Writes snapshots-v1/: a tiny snapshot folder in the format emakit wrote before raw weights were an option
(format_version 1, averages only), kept so that later readers are tested on it. Run from the repository root
with the code of that time: ``PYTHONPATH=src python tests/data/snapshots-v1/make_snapshots_v1.py``."""

from pathlib import Path

import torch
from torch import nn

from emakit import EMA

FOLDER = Path(__file__).parent / "run"

torch.manual_seed(0)
model = nn.Linear(3, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
ema = EMA(sigma_rel=[0.05, 0.2], snapshot_interval="4ba", snapshot_folder=FOLDER)
ema.attach(model)
x, y = torch.randn(32, 3), torch.randn(32, 2)
for step in range(12):
    loss = nn.functional.mse_loss(model(x[step::4]), y[step::4])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    ema.step()
torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, FOLDER.parent / "final-weights.pt")
