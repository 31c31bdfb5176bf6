"""Run under torchrun (2 ranks): evaluate an uneven validation set (11 samples, batches of 2) with the Trainer's
evaluation, under DDP and FSDP2, and save each rank's metrics and the sample ids each rank counted."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit import Trainer
from emakit.parallel.ranks import get_rank


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(11, 3, generator=g), torch.randint(0, 4, (11,), generator=g))


def main(out: Path) -> None:
    results = {}
    for parallelism in ("ddp", "fsdp"):
        train = DataLoader(data(), batch_size=2)
        trainer = Trainer(
            Net(),
            train,
            "1ba",
            eval_dataloader=DataLoader(data(), batch_size=2),
            parallelism=parallelism,
            progress_bar=False,
            optimizers=[],
            device="cpu",
        )
        results[parallelism] = trainer.eval()
        results[f"{parallelism}_real"] = trainer.state.eval_dataloader.sampler.num_real  # type: ignore[union-attr]
    torch.save(results, out / f"eval_rank{get_rank()}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
    from conftest import exit_hard

    exit_hard()
