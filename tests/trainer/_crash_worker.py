"""A training job for the crash test: resumes from its save folder, checkpoints every batch.

Usage: python _crash_worker.py SAVE_FOLDER OUT_FILE [--slow-writes]
Prints "step" lines as it trains; writes the final training and EMA weights and every post-hoc snapshot
(SAVE_FOLDER/snapshots) to OUT_FILE.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import emakit.checkpoint as ckpt
from emakit import EMA
from emakit.core import Callback
from emakit.trainer import Trainer


class Announce(Callback):
    def batch_end(self, state: Any, logger: Any) -> None:
        print(f"step {state.timestamp.batch}", flush=True)


def main() -> None:
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    if "--slow-writes" in sys.argv:
        # Widen the window inside checkpoint writes so that random kills land there often.
        real_fsync = ckpt.os.fsync

        def slow_fsync(fd: int) -> None:
            time.sleep(0.02)
            real_fsync(fd)

        ckpt.os.fsync = slow_fsync  # type: ignore[assignment]

    torch.set_num_threads(1)  # bitwise reproducibility and no oversubscription on a busy machine
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 4))
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(96, 16, generator=g), torch.randint(0, 4, (96,), generator=g))
    loader = DataLoader(data, batch_size=8, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # two averages, snapshotted every other batch: kills also land inside snapshot writes
    ema = EMA(half_life=["3ba", "12ba"], ema_start="4ba", snapshot_interval="2ba", snapshot_folder=folder / "snapshots")
    trainer = Trainer(
        model,
        loader,
        "20ep",
        algorithms=[ema],
        optimizers=optimizer,
        callbacks=[Announce()],
        save_folder=folder,
        save_interval="1ba",
        save_num_checkpoints_to_keep=3,
        autoresume=True,
        seed=0,
        progress_bar=False,
    )
    trainer.fit()
    snapshots = {
        f"{path.name}/{name}": tensor
        for path in sorted((folder / "snapshots").glob("snapshot-*.safetensors"))
        for name, tensor in load_file(str(path)).items()
    }
    torch.save({"model": trainer.state.model.state_dict(), "ema": ema.ema_tensors, "snapshots": snapshots}, out)
    print("done", flush=True)


if __name__ == "__main__":
    main()
