"""Worker for the 2-rank Lightning DDP token count: ``torchrun --standalone --nproc_per_node=2 <this> OUT``.

Each rank trains on its half of padded dict batches (Lightning's DistributedSampler, no shuffling) with
``EMACallback(half_life="200tok")``; each writes ``OUT/rank{r}.pt``: its averager's clock and average, and the
tokens and samples of its own batches, so the test can check that every rank counted both ranks' amounts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from emakit.integrations.lightning import EMACallback

EPOCHS, PER_RANK_BATCH, N = 2, 4, 40


def data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 9, (N,), generator=g)
    ids = torch.randint(0, 16, (N, 8), generator=g)
    return [{"input_ids": ids[i], "attention_mask": (torch.arange(8) < lengths[i]).long()} for i in range(N)]


class Pooled(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(16, 4), nn.Linear(4, 1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return self.head((self.embed(batch["input_ids"]) * mask).sum(1) / mask.sum(1)).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Seen(Callback):
    """This rank's own tokens and samples, batch by batch."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.samples: list[int] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.tokens.append(int(batch["attention_mask"].sum()))
        self.samples.append(len(batch["input_ids"]))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    callback, seen = EMACallback(half_life="200tok", ema_start="16sp"), Seen()
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback, seen])  # fmt: skip
    trainer.fit(Pooled(), DataLoader(data(), batch_size=PER_RANK_BATCH, shuffle=False))
    result = {
        "timestamp": callback.averager.timestamp.state_dict(),
        "ema": {n: t.detach().clone() for n, t in callback.averager.ema_tensors.items()},
        "tokens": seen.tokens,
        "samples": seen.samples,
    }
    torch.save(result, out / f"rank{trainer.global_rank}.pt")
    trainer.strategy.barrier()
    os._exit(0)  # teardown of the process group sometimes aborts here; the results are written


if __name__ == "__main__":
    main(Path(sys.argv[1]))
