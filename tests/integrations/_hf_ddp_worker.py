"""Run under ``torchrun --nproc_per_node=2`` (gloo, CPU) by test_transformers.py: EMATrainer with DDP.

Trains RUN in one go, then again cut after step 3 and resumed from checkpoint-3 by a new Trainer; each rank
saves what it ended with to ``<out>/rank<r>.pt``. Usage: ``torchrun ... _hf_ddp_worker.py OUT``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

RUN: dict[str, Any] = {
    "ema": {"half_life": "2ba", "ema_start": "2ba"},
    "args": {
        "per_device_train_batch_size": 2,
        "optim": "sgd",  # Adam's normalised steps would magnify rounding differences from the gradient all-reduce
        "learning_rate": 0.5,
        "max_steps": 6,
        "eval_strategy": "steps",
        "eval_steps": 3,
        "save_strategy": "steps",
        "save_steps": 3,
    },
}


def main(out: Path) -> None:
    from _hf_common import StopAt, TokenData, tiny_model, training_args, weights

    from emakit.integrations.transformers import EMACallback, EMATrainer

    torch.set_num_threads(1)

    def run(folder: Path, *extra: Any, resume: bool = False) -> tuple[EMATrainer, EMACallback]:
        # snapshots too: rank 0 writes them; the resumed run continues the cut run's series
        callback = EMACallback(**RUN["ema"], snapshot_interval="1ba", snapshot_folder=folder / "snapshots")
        trainer = EMATrainer(
            model=tiny_model(),
            args=training_args(folder, **RUN["args"]),
            train_dataset=TokenData(40, seed=0),
            eval_dataset=TokenData(16, seed=1),
            callbacks=[callback, *extra],
        )
        trainer.train(resume_from_checkpoint=True if resume else None)
        return trainer, callback

    def ema_params(callback: EMACallback) -> dict[str, torch.Tensor]:
        names = set(weights(callback.averager.model))
        return {n: t.detach().clone() for n, t in callback.averager.ema_tensors.items() if n in names}

    full, full_callback = run(out / "full")
    eval_loss = full.evaluate()["eval_loss"]
    run(out / "cut", StopAt(3))
    resumed, resumed_callback = run(out / "cut", resume=True)
    rank = torch.distributed.get_rank()
    # Last, because FSDP arguments set ACCELERATE_USE_FSDP in this process's environment.
    try:
        EMATrainer(model=tiny_model(), args=training_args(out / "fsdp", fsdp=True), callbacks=[EMACallback()])
        fsdp_error = ""
    except ValueError as error:
        fsdp_error = str(error)
    torch.save(
        {
            "world_size": torch.distributed.get_world_size(),
            "weights": weights(full.model),
            "ema": ema_params(full_callback),
            "eval_loss": eval_loss,
            "resumed_weights": weights(resumed.model),
            "resumed_ema": ema_params(resumed_callback),
            "fsdp_error": fsdp_error,
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(Path(sys.argv[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
    from conftest import exit_hard

    exit_hard()
