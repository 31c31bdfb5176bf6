"""A plain Accelerate training loop with an emakit EMA, checkpointed by ``accelerator.save_state`` and resumed exactly.

A small MLP with BatchNorm (floating buffers that are averaged, an integer one that is copied) and dropout
learns a synthetic 4-class problem made here; nothing is downloaded. Checkpoints are ``OUT/checkpoints/step_<N>/``
(Accelerate's files, with the EMA's state as ``custom_checkpoint_0.pkl``); at the end ``OUT/ema_weights.safetensors``
holds the EMA model for inference. ::

    python examples/accelerate_ema.py --steps 40 --out runs/acc                   # 40 optimizer steps
    python examples/accelerate_ema.py --steps 40 --out runs/acc2 --stop-after 20  # as if killed after step 20
    python examples/accelerate_ema.py --steps 40 --out runs/acc2 --resume         # the same 40 steps, exactly
    accelerate launch --num_processes 2 examples/accelerate_ema.py --steps 40 --out runs/ddp   # or torchrun

``--steps`` is the whole run's length (the learning-rate schedule and ``ema_start`` depend on it), so a run
that is cut and resumed must be given the same ``--steps``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit import EMA, export_ema_weights
from emakit.integrations.accelerate import prepare_ema


def make_data(n: int, seed: int) -> TensorDataset:
    """``n`` points in 16 dimensions labelled by a fixed random linear teacher, with 10% label noise."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, 16, generator=g)
    y = (x @ teacher).argmax(dim=1)
    noisy = torch.rand(n, generator=g) < 0.1
    y[noisy] = torch.randint(0, 4, (int(noisy.sum()),), generator=g)
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 4))


def evaluate(model: nn.Module, data: TensorDataset) -> dict[str, float]:
    """Loss and accuracy on ``data``, in one batch (every rank evaluates all of it)."""
    was_training = model.training
    model.eval()
    x, y = data.tensors
    with torch.no_grad():
        logits = model(x.to(next(model.parameters()).device)).cpu()
    model.train(was_training)
    return {"loss": F.cross_entropy(logits, y).item(), "accuracy": (logits.argmax(1) == y).float().mean().item()}


def latest_checkpoint(out: Path) -> Path | None:
    found = [
        (int(m.group(1)), p) for p in (out / "checkpoints").glob("step_*") if (m := re.fullmatch(r"step_(\d+)", p.name))
    ]
    return max(found)[1] if found else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps in the whole run (default 40)")
    parser.add_argument("--out", type=Path, default=Path("runs/accelerate_ema"), help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this step (simulates a crash)")
    parser.add_argument("--save-every", type=int, default=10, help="checkpoint every this many steps (default 10)")
    parser.add_argument("--batch-size", type=int, default=16, help="micro-batch size per process (default 16)")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step (default 2)")
    parser.add_argument("--half-life", default="10ba", help="EMA half-life in optimizer steps (default 10ba)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is available")
    args = parser.parse_args(argv)
    for name in ("steps", "save_every", "batch_size", "accumulate"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train (or resume) and return the final training weights, EMA weights and metrics (also printed)."""
    args = parse_args(argv)
    accelerator = Accelerator(
        # Without a GPU, Accelerate joins torchrun's processes into one data-parallel group only with cpu=True;
        # otherwise each process would train alone on all the data.
        cpu=args.cpu or not torch.cuda.is_available(),
        gradient_accumulation_steps=args.accumulate,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # each epoch's order from the seed
    )
    set_seed(args.seed)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / args.steps))
    # The loader's own generator: starting an epoch then draws its seed from it, not from the global RNG that
    # dropout uses, so a run resumed mid-epoch (load_state restores the global RNG) sees the same dropout masks.
    shuffle_rng = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(make_data(512, seed=args.seed), batch_size=args.batch_size, shuffle=True, generator=shuffle_rng)
    model, optimizer, loader, schedule = accelerator.prepare(model, optimizer, loader, schedule)
    # Attached and registered before load_state, which then restores it with everything else.
    ema = prepare_ema(accelerator, model, EMA(half_life=args.half_life), max_duration=f"{args.steps}ba")

    step = 0
    if args.resume:
        folder = latest_checkpoint(args.out)
        if folder is None:
            raise SystemExit(f"--resume: no checkpoint in {args.out / 'checkpoints'}")
        accelerator.load_state(str(folder))
        step = ema.timestamp.batch  # the EMA's clock counts optimizer steps
        accelerator.print(f"resumed from {folder} at step {step}")

    micro_batches = step * args.accumulate
    epoch, skip = divmod(micro_batches, len(loader))
    model.train()
    while step < args.steps:
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for x, y in batches:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            ema.step()  # once per optimizer step
            step += 1
            if step % args.save_every == 0 or step == args.steps:
                accelerator.save_state(str(args.out / "checkpoints" / f"step_{step}"))
            if step == args.stop_after:
                accelerator.print(f"stopped after step {step}")
                return {"step": step}
            if step == args.steps:
                break
        else:
            ema.epoch_end()  # a whole epoch done ('ep' units blend here; 'ba' ones only count it)
        epoch += 1

    val = make_data(256, seed=args.seed + 1)
    raw = evaluate(model, val)
    with ema.average_parameters():
        averaged = evaluate(model, val)
    export_ema_weights(ema, args.out / "ema_weights.safetensors")  # every rank calls it; the main one writes
    accelerator.print(
        f"step {step}: validation loss {raw['loss']:.4f} (training weights), {averaged['loss']:.4f} (EMA); "
        f"accuracy {raw['accuracy']:.3f} vs {averaged['accuracy']:.3f}"
    )
    unwrapped = accelerator.unwrap_model(model)
    return {
        "step": step,
        "raw": raw,
        "ema_metrics": averaged,
        "weights": {n: t.detach().cpu().clone() for n, t in unwrapped.state_dict().items()},
        "ema": {n: t.detach().cpu().clone() for n, t in ema.ema_tensors.items()},
        "n_averaged": ema.n_averaged,
        "timestamp": ema.timestamp.state_dict(),
    }


if __name__ == "__main__":
    main()
