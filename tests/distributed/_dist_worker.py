"""Worker for the 2-rank tests, run as ``torchrun --standalone --nproc_per_node=2 _dist_worker.py MODE OUT [...]``.

MODE ``main`` trains the same model with DDP and with FSDP2, resumes an FSDP run from a mid-epoch
checkpoint, loads a single-process checkpoint under DDP, and saves what each rank saw to
``OUT/rank{r}.pt`` for the tests to compare with single-process runs. ``crash`` and ``hang`` make
rank 1 raise or stop answering at batch 3.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from emakit import EMA, Trainer
from emakit.core import Algorithm, Callback, Event
from emakit.distributed import export_ema_weights, local_tensor, model_weights

SEED = 7
BATCH_PER_RANK = 4
WORLD = 2


class Net(nn.Module):
    """Uneven shards (63 and 5 rows over 2 ranks; a 1-row parameter leaves rank 1 an empty shard), a frozen
    parameter (not averaged) and an integer buffer (copied). No BatchNorm: per-rank batch statistics
    would differ from a single process's."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 63)
        self.fc2 = nn.Linear(63, 5)
        self.scale = nn.Parameter(torch.ones(1))
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc2(torch.relu(self.fc1(x))) * self.scale + self.frozen.sum()


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def datasets() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(32, 16, generator=g), torch.randint(0, 5, (32,), generator=g))
    evaluation = TensorDataset(torch.randn(16, 16, generator=g), torch.randint(0, 5, (16,), generator=g))
    return train, evaluation


def loaders(single_process: bool) -> tuple[DataLoader, DataLoader]:
    """Under torchrun the Trainer splits these; in one process the same global batches come from a
    one-replica DistributedSampler (same permutation per epoch) with twice the batch size."""
    train, evaluation = datasets()
    if single_process:
        sampler: Any = DistributedSampler(train, num_replicas=1, rank=0, shuffle=True, seed=SEED)
        return (
            DataLoader(train, batch_size=BATCH_PER_RANK * WORLD, sampler=sampler),
            DataLoader(evaluation, batch_size=BATCH_PER_RANK * WORLD),
        )
    return DataLoader(train, batch_size=BATCH_PER_RANK, shuffle=True), DataLoader(evaluation, batch_size=BATCH_PER_RANK)


def make_trainer(
    parallelism: str | None, single_process: bool = False, duration: str = "2ep", overlap: bool = False, **kwargs: Any
) -> tuple[Trainer, EMA]:
    model = make_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)  # created before sharding: the Trainer re-points it
    ema = EMA(half_life="2ba", overlap=overlap)
    train, evaluation = loaders(single_process)
    trainer = Trainer(
        model,
        train,
        duration,
        algorithms=[ema],
        optimizers=optimizer,
        eval_dataloader=evaluation,
        seed=SEED,
        progress_bar=False,
        parallelism=parallelism,
        **kwargs,
    )
    return trainer, ema


def eval_history(trainer: Trainer) -> list[dict[str, float]]:
    return [h for h in trainer.metrics.history if "eval/loss" in h]


def gathered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        out[name] = full.detach().cpu().clone()
    return out


def check_update_is_local(ema: EMA, model: nn.Module, rank: int) -> bool:
    """Each rank in turn updates its EMA alone while the other waits at a barrier: an update that needed
    a collective would block (and time out) or mismatch the barrier. Checks the shards against lerp."""
    ok = True
    for turn in range(WORLD):
        if rank == turn:
            before = [t.clone() for t in ema.storage.views()]  # type: ignore[union-attr]
            weights = [local_tensor(t).detach().clone() for t in ema._tracked.model_tensors()]
            ema.update()
            for old, new, w in zip(before, ema.storage.views(), weights, strict=True):  # type: ignore[union-attr]
                expected = old.lerp(w.to(old.dtype), 1 - ema.schedule.smoothing) if old.is_floating_point() else w
                ok = ok and torch.allclose(new, expected, rtol=1e-6, atol=1e-7)
        dist.barrier()
    return ok


def main(out: Path, single_checkpoint: Path) -> None:
    record_: dict[str, Any] = {}

    ddp, ddp_ema = make_trainer(None, save_folder=out / "ddp_ckpt")  # None under torchrun means DDP
    rank = ddp.state.rank
    ddp.fit()
    record_["ddp"] = {
        "parallelism": ddp.parallelism,
        "wrapped": type(ddp.state.model).__name__,
        "ema": {n: t.detach().clone() for n, t in ddp_ema.ema_tensors.items()},
        "weights": model_weights(ddp.state.model),
        "eval": eval_history(ddp),
        "ema_nbytes": ddp_ema.storage.nbytes,  # type: ignore[union-attr]
    }

    fsdp, fsdp_ema = make_trainer("fsdp", save_folder=out / "fsdp_ckpt", save_interval="2ba")
    fsdp.fit()
    storage = fsdp_ema.storage
    assert storage is not None
    record_["fsdp"] = {
        "ema": gathered(fsdp_ema.state_dict()["ema"]),
        "weights": model_weights(fsdp.state.model),
        "eval": eval_history(fsdp),
        "ema_nbytes": storage.nbytes,
        "ema_local_numel": {n: t.numel() for n, t in storage.tensors.items()},
    }
    export_ema_weights(fsdp, out / "fsdp_ema_export.pt")
    record_["fsdp"]["update_is_local"] = check_update_is_local(fsdp_ema, fsdp.state.model, rank)
    # the EMA as a teacher under FSDP2 in emakit's Trainer: a module sharded like the student, run by every rank
    # (last: the teacher's forward counts in the average's own `calls` buffer)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(7))
    teacher = fsdp_ema.ema_model
    with torch.no_grad():
        teacher_out = teacher(x).clone()
        with fsdp_ema.average_parameters(fsdp.state.model):
            swapped_out = fsdp.state.model(x).clone()
    teacher_record = {
        "teacher_out": teacher_out,
        "swapped_out": swapped_out,
        "requires_grad": any(p.requires_grad for p in teacher.parameters()),
        "sharded": all(type(p).__name__ == "DTensor" for p in teacher.parameters()),
    }
    record_["fsdp"]["teacher"] = teacher_record

    for parallelism in ("ddp", "fsdp"):  # the update overlapped with the next step on a worker thread
        overlapped, overlapped_ema = make_trainer(parallelism, overlap=True)
        overlapped.fit()
        record_[f"{parallelism}_overlap"] = {
            "ema": gathered(overlapped_ema.state_dict()["ema"]),
            "weights": model_weights(overlapped.state.model),
            "eval": eval_history(overlapped),
            "overlap": type(overlapped_ema._averages.overlap).__name__,
        }

    resumed, resumed_ema = make_trainer(
        "fsdp", save_folder=out / "fsdp_resumed_ckpt", save_interval="2ba", load_path=out / "fsdp_ckpt" / "ep0-ba2"
    )
    record_["resumed_at"] = resumed.state.timestamp.batch
    resumed.fit()
    record_["resumed"] = {
        "ema": gathered(resumed_ema.state_dict()["ema"]),
        "weights": model_weights(resumed.state.model),
        "eval": eval_history(resumed),
    }

    autoresumed, _ = make_trainer("fsdp", save_folder=out / "fsdp_ckpt", autoresume=True)
    record_["autoresumed_from"] = Path(autoresumed.resumed_from or "").name

    nan_ema = EMA(half_life="2ba", skip_nonfinite=True)
    train, _ = loaders(single_process=False)
    nan_run = Trainer(
        make_net(), train, "3ba", algorithms=[PoisonShard(), nan_ema], parallelism="fsdp", progress_bar=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nan_run.fit()
    record_["nan_skips"] = {"skipped": nan_ema.num_skipped_nonfinite, "updates": (nan_ema.n_averaged - 1)}

    loaded, loaded_ema = make_trainer("ddp", load_path=single_checkpoint)
    record_["loaded_single"] = {
        "ema": {n: t.detach().clone() for n, t in loaded_ema.ema_tensors.items()},
        "weights": model_weights(loaded.state.model),
        "batch": loaded.state.timestamp.batch,
    }
    torch.save(record_, out / f"rank{rank}.pt")


class PoisonShard(Algorithm):
    """At batch 3, before the EMA runs, put a NaN into rank 1's shard of fc2.weight only."""

    def match(self, event: Event, state: Any) -> bool:
        return event == Event.BATCH_END and state.timestamp.batch == 3 and state.rank == 1

    def apply(self, event: Event, state: Any, logger: Any) -> None:
        with torch.no_grad():
            local_tensor(state.model.fc2.weight).view(-1)[0] = float("nan")


class FailAt(Callback):
    """On rank 1, at batch 3: raise (``crash``) or stop answering (``hang``)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def batch_end(self, state: Any, logger: Any) -> None:
        if state.rank == 1 and state.timestamp.batch == 3:
            if self.mode == "crash":
                raise RuntimeError("injected failure on rank 1")
            time.sleep(600)


def fail(mode: str) -> None:
    train, _ = datasets()
    data: Dataset = train
    trainer = Trainer(
        make_net(),
        DataLoader(data, batch_size=BATCH_PER_RANK),
        "10ep",
        algorithms=[EMA(half_life="2ba")],
        callbacks=[FailAt(mode)],
        progress_bar=False,
        dist_timeout=5.0,
    )
    trainer.fit()


@record
def entry() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "main":
        main(out, Path(sys.argv[3]))
        # Every rank has written its results: a final barrier, then leave without tearing the process group
        # down (gloo aborts there about one run in 15 here, which must not fail the test).
        dist.barrier()
        sys.stdout.flush()
        os._exit(0)
    else:
        fail(mode)


if __name__ == "__main__":
    entry()
