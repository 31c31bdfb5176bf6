"""Trainer: a training loop small enough to read, that runs algorithms and callbacks at events.

See :class:`emakit.core.Event` for the loop as pseudocode.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emakit.algorithms.averaging import Averaging
from emakit.averaging import Averager
from emakit.callbacks.checkpoint_saver import CheckpointSaver
from emakit.callbacks.progress import ProgressBar
from emakit.checkpoint import load_checkpoint, save_checkpoint
from emakit.core.algorithm import Algorithm
from emakit.core.batches import LossFn, batch_size, batch_tokens, forward_and_loss, loss_of_first, to_device
from emakit.core.callback import Callback
from emakit.core.engine import Engine
from emakit.core.event import Event
from emakit.core.logger import InMemoryLogger, Logger, LoggerDestination
from emakit.core.state import State
from emakit.parallel.data import set_sampler_epoch, shard_dataloader
from emakit.parallel.launch import (
    DEFAULT_TIMEOUT,
    check_parallelism,
    init_distributed,
    note_peer_failure,
    prepare_model,
    resolve_device,
    resolve_parallelism,
)
from emakit.parallel.ranks import all_reduce_sum, get_rank, get_world_size
from emakit.rng import capture_rng, loader_generators, restore_rng
from emakit.time import Time, TimeUnit

__all__ = ["Trainer", "evaluate"]

#: What ``algorithms`` accepts: Trainer algorithms, and averagers (each run by an :class:`Averaging`).
_ALGORITHM = (Algorithm, Averager)


def _as_list(value: Any, name: str, kind: type | tuple[type, ...]) -> list[Any]:
    if value is None:
        return []
    items = [value] if isinstance(value, kind) else list(value)
    for item in items:
        if not isinstance(item, kind):
            kinds = kind if isinstance(kind, tuple) else (kind,)
            accepted = " or ".join(k.__name__ for k in kinds)
            raise TypeError(f"{name} must hold {accepted} instances, got {type(item).__name__}")
    return items


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataloader: Iterable[Any],
    loss_fn: LossFn | None = None,
    device: torch.device | None = None,
    all_reduce: bool = False,
) -> dict[str, float]:
    """Mean loss (and accuracy, for class logits with integer targets) of ``model`` over ``dataloader``.

    The model is put in eval mode and returned to its previous mode; the global torch RNG is left as it
    was, so evaluating does not change what training does next. With ``all_reduce`` every rank of the
    process group calls this on its part of the data and all get the metrics of the whole; a loader split
    by the Trainer (:class:`~emakit.parallel.data.EvalDistributedSampler`) counts every sample exactly once.
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    # A distributed evaluation sampler pads with repeated samples at the tail: count only this rank's real ones.
    remaining: int | None = getattr(getattr(dataloader, "sampler", None), "num_real", None)
    was_training = model.training
    rng = torch.get_rng_state()
    model.eval()
    total_loss, total_correct, total, counted = 0.0, 0, 0, 0
    try:
        for raw in dataloader:
            batch = to_device(raw, device)
            n = batch_size(batch)
            outputs, loss, targets = forward_and_loss(model, batch, loss_fn)
            if remaining is not None:
                if remaining < n:  # padding in this batch: the loss of the real samples only
                    outputs, loss, targets = loss_of_first(model, batch, outputs, remaining, loss_fn)
                    n = remaining
                remaining -= n
            if n == 0:
                continue
            total_loss += float(loss) * n
            total += n
            if (
                isinstance(outputs, torch.Tensor)
                and isinstance(targets, torch.Tensor)
                and outputs.dim() == 2
                and targets.dim() == 1
                and not targets.is_floating_point()
            ):
                total_correct += int((outputs.argmax(dim=1) == targets).sum())
                counted += n
    finally:
        model.train(was_training)
        torch.set_rng_state(rng)
    if all_reduce:
        sums = all_reduce_sum([total_loss, total_correct, total, counted], device)
        total_loss, total_correct, total, counted = sums[0], int(sums[1]), int(sums[2]), int(sums[3])
    if total == 0:
        raise ValueError("eval_dataloader yielded no batches")
    metrics = {"eval/loss": total_loss / total}
    if counted:
        metrics["eval/accuracy"] = total_correct / counted
    return metrics


class Trainer:
    """Train ``model`` on ``train_dataloader`` for ``max_duration``, running algorithms and callbacks.

    Args:
        model: any ``nn.Module``. If it defines ``loss(outputs, batch)``, the loop calls ``model(batch)``
            and that loss; otherwise batches are ``(inputs, targets)`` and the loss is
            ``loss_fn(model(inputs), targets)``.
        train_dataloader: an iterable of batches (usually a DataLoader).
        max_duration: total training time, ``'Nep'``, ``'Nba'`` or ``'Nsp'``.
        algorithms: e.g. ``[EMA(half_life='50ba')]``: averagers (EMA, SWA) and other algorithms, run before callbacks
            at each event.
        callbacks: extra callbacks; a CheckpointSaver is added for ``save_folder`` and a ProgressBar for
            ``progress_bar=True``.
        optimizers: an optimizer or a list; default ``SGD(lr=0.1)`` over the trainable parameters.
        schedulers: a learning-rate scheduler or a list, stepped after every batch.
        loss_fn: default ``torch.nn.functional.cross_entropy``.
        eval_dataloader: batches to evaluate on, on the EMA weights once an EMA has started.
        eval_interval: how often to evaluate, ``'Nep'`` or ``'Nba'`` (default ``'1ep'``).
        save_folder: where checkpoints go; see :class:`CheckpointSaver`.
        save_interval: how often to save; see :class:`CheckpointSaver`.
        save_num_checkpoints_to_keep: how many checkpoints to keep; see :class:`CheckpointSaver`.
        save_overwrite: let a fresh run start in a ``save_folder`` holding another run's checkpoints (they are
            deleted); without it that is refused. A resumed run needs no permission.
        load_path: a checkpoint to resume from, or ``'latest'``: the newest readable checkpoint in
            ``save_folder`` (unreadable newer files are reported and skipped).
        autoresume: resume from the newest readable checkpoint in ``save_folder`` if there is one, else
            start fresh; for jobs that are restarted after a crash or preemption.
        device: ``'cpu'``, ``'cuda'``, ... (default: CUDA when available).
        seed: seeds python, numpy and torch before training.
        progress_bar: show a tqdm bar on rank 0.
        loggers: destinations with ``log_metrics(metrics, step)`` (rank 0 only); an :class:`InMemoryLogger`
            is always attached as ``trainer.metrics``.
        parallelism: ``None``, ``'ddp'`` or ``'fsdp'`` (FSDP2 ``fully_shard``, with a shard-local EMA and
            DCP checkpoint directories). Under ``torchrun`` the process group is joined automatically
            and None means ``'ddp'`` when there are several processes; see :mod:`emakit.distributed`.
        dist_timeout: seconds (or a timedelta) a collective waits for the other ranks before the run
            fails, so a dead or stuck rank ends the launch instead of hanging it (default 10 minutes).
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataloader: Iterable[Any],
        max_duration: str | Time,
        algorithms: Sequence[Algorithm | Averager] | Algorithm | Averager = (),
        callbacks: Sequence[Callback] | Callback = (),
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        schedulers: Any = None,
        loss_fn: LossFn | None = None,
        eval_dataloader: Iterable[Any] | None = None,
        eval_interval: str | Time | None = None,
        save_folder: str | os.PathLike[str] | None = None,
        save_interval: str | Time = "1ep",
        save_num_checkpoints_to_keep: int = -1,
        save_overwrite: bool = False,
        load_path: str | os.PathLike[str] | None = None,
        autoresume: bool = False,
        device: str | torch.device | None = None,
        seed: int | None = None,
        progress_bar: bool = True,
        loggers: Sequence[LoggerDestination] = (),
        parallelism: str | None = None,
        dist_timeout: float | timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(train_dataloader, Iterable):
            raise TypeError(f"train_dataloader must be iterable, got {type(train_dataloader).__name__}")
        if eval_dataloader is not None and not isinstance(eval_dataloader, Iterable):
            raise TypeError(f"eval_dataloader must be iterable, got {type(eval_dataloader).__name__}")
        duration = Time.coerce(
            max_duration, "max_duration", (TimeUnit.EPOCH, TimeUnit.BATCH, TimeUnit.SAMPLE), positive=True
        )
        if duration.value <= 0:
            raise ValueError(f"max_duration must be greater than 0, got {str(duration)!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        if not isinstance(autoresume, bool):
            raise TypeError(f"autoresume must be a bool, got {autoresume!r}")
        if (autoresume or load_path == "latest") and save_folder is None:
            what = "autoresume=True" if autoresume else "load_path='latest'"
            raise ValueError(f"{what} needs save_folder: it resumes from the newest checkpoint there")
        if load_path is not None and not isinstance(load_path, (str, os.PathLike)):
            raise TypeError(f"load_path must be a path or 'latest', got {load_path!r}")
        if not isinstance(progress_bar, bool):
            raise TypeError(f"progress_bar must be a bool, got {progress_bar!r}")
        scheduler_list = (
            [] if schedulers is None else (list(schedulers) if isinstance(schedulers, (list, tuple)) else [schedulers])
        )
        for sch in scheduler_list:
            if not (callable(getattr(sch, "step", None)) and callable(getattr(sch, "state_dict", None))):
                raise TypeError(f"schedulers must have step() and state_dict(), got {type(sch).__name__}")
        check_parallelism(parallelism)
        self.device = self._resolve_device(device)
        distributed = init_distributed(self.device, dist_timeout)  # joins torchrun's process group
        self.device = resolve_device(self.device)
        rank, world_size = get_rank(), get_world_size()
        self.parallelism = resolve_parallelism(parallelism, distributed, world_size)

        if seed is not None:
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        self.seed = seed

        algorithm_list = [
            Averaging(a) if isinstance(a, Averager) else a for a in _as_list(algorithms, "algorithms", _ALGORITHM)
        ]
        averagers = [a.name for a in algorithm_list if a.averages_model]
        shown = " and ".join(averagers)
        if len(set(averagers)) > 1:
            raise ValueError(
                "EMA and SWA do not compose: each puts its own average into the model for evaluation, checkpoints "
                f"and exports, and model-averaging methods do not compose well; got algorithms {shown}: give one of "
                "them (or train twice)"
            )
        if len(averagers) > 1:
            raise ValueError(
                f"one {averagers[0]} per Trainer: each would put its average into the model and save its state under "
                f"the same name; got algorithms {shown} (several EMAs in one pass: EMA(half_life=[...]))"
            )
        callback_list = _as_list(callbacks, "callbacks", Callback)
        if save_folder is not None:
            callback_list.append(
                CheckpointSaver(save_folder, save_interval, save_num_checkpoints_to_keep, overwrite=save_overwrite)
            )
        if progress_bar:
            callback_list.append(ProgressBar())

        if eval_interval is not None and eval_dataloader is None:
            raise ValueError(f"eval_interval={eval_interval!r} was given without an eval_dataloader")
        self.eval_interval: Time | None = None
        if eval_dataloader is not None:
            self.eval_interval = Time.coerce(
                eval_interval if eval_interval is not None else "1ep",
                "eval_interval",
                (TimeUnit.EPOCH, TimeUnit.BATCH),
                positive=True,
            )
            if self.eval_interval.value <= 0:
                raise ValueError(f"eval_interval must be greater than 0, got {str(self.eval_interval)!r}")

        model.to(self.device)
        # Wrapped before INIT, so that the EMA follows (and the optimizers hold) the DDP/FSDP parameters.
        given_optimizers = _as_list(optimizers, "optimizers", torch.optim.Optimizer)
        model = prepare_model(model, self.parallelism, self.device, given_optimizers)
        train_dataloader = self._shard_loader(train_dataloader, "train_dataloader", world_size, rank)
        if eval_dataloader is not None:
            eval_dataloader = self._shard_loader(eval_dataloader, "eval_dataloader", world_size, rank, pad=False)
        self.loss_fn: LossFn = loss_fn or nn.functional.cross_entropy
        self.metrics = InMemoryLogger()
        self.logger = Logger([self.metrics, *(loggers if rank == 0 else ())])
        batches_per_epoch: int | None
        try:
            batches_per_epoch = len(train_dataloader)  # type: ignore[arg-type]
        except TypeError:
            batches_per_epoch = None
        self.state = State(
            model=model,
            max_duration=duration,
            train_dataloader=train_dataloader,
            eval_dataloader=eval_dataloader,
            algorithms=algorithm_list,
            callbacks=callback_list,
            device=self.device,
            batches_per_epoch=batches_per_epoch,
            rank=rank,
            world_size=world_size,
        )
        self.engine = Engine(self.state, self.logger)
        self.engine.run_event(Event.INIT)

        if optimizers is None:
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizers = torch.optim.SGD(trainable, lr=0.1) if trainable else []
        self.state.optimizers = _as_list(optimizers, "optimizers", torch.optim.Optimizer)
        self.state.schedulers = scheduler_list

        self.resumed_from: str | None = None
        if load_path == "latest" or (autoresume and load_path is None):
            assert save_folder is not None
            if self._load(save_folder, newest=True) is None and load_path == "latest":
                raise FileNotFoundError(f"load_path='latest': no readable checkpoint in {str(save_folder)!r}")
        elif load_path is not None:
            self.load_checkpoint(load_path)

    @staticmethod
    def _resolve_device(device: str | torch.device | None) -> torch.device:
        if device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from e
        if resolved.type == "meta":
            raise ValueError("device='meta' holds no data to train; use 'cpu' or 'cuda'")
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for but CUDA is not available")
        return resolved

    def _shard_loader(
        self, loader: Iterable[Any], what: str, world_size: int, rank: int, pad: bool = True
    ) -> Iterable[Any]:
        """``loader`` split across the ranks (unchanged in one process): training loaders with a seeded
        DistributedSampler (equal batch counts), evaluation loaders with every sample on exactly one rank."""
        return shard_dataloader(loader, world_size=world_size, rank=rank, seed=self.seed, what=what, pad=pad)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write a checkpoint whose ``state.model`` is the training weights (EMA weights in its EMA state).

        Call it on every rank: a sharded (FSDP) run writes the DCP directory ``path`` from all ranks;
        otherwise rank 0 writes the file. An existing ``path`` is replaced only with ``overwrite=True``.
        """
        return save_checkpoint(self.state, path, publish=False, overwrite=overwrite)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Resume from ``path``: weights, optimizers, schedulers, algorithms, callbacks, timestamp, RNG.

        ``path`` is a checkpoint file or a DCP checkpoint directory (written by an FSDP run).
        """
        self._load(path)

    def _load(self, path: str | os.PathLike[str], newest: bool = False) -> Path | None:
        loaded = load_checkpoint(self.state, path, newest=newest)
        if loaded is None:
            return None
        source, checkpoint = loaded
        restore_rng(checkpoint["state"]["rng"]["now"], loader_generators(self.state.train_dataloader))
        self.resumed_from = str(source)
        self.engine.run_event(Event.AFTER_LOAD)
        return source

    # ------------------------------------------------------------------ the loop
    def fit(self) -> None:
        """Train until ``max_duration``. Afterwards ``state.model`` holds the training weights."""
        state = self.state
        state.model.train()
        self.engine.run_event(Event.FIT_START)
        try:
            while not state.is_done or self._epoch_end_pending():
                self._train_epoch()
        except RuntimeError as e:
            note_peer_failure(e, state.rank, state.world_size)
            raise
        self.engine.run_event(Event.FIT_END)

    def _epoch_end_pending(self) -> bool:
        """True when every batch of the epoch has run but EPOCH_END has not (a resume at the last batch)."""
        bpe, done = self.state.batches_per_epoch, self.state.timestamp.batch_in_epoch
        return bpe is not None and done > 0 and done >= bpe

    def _epoch_iterator(self) -> Iterator[Any]:
        """An iterator over this epoch's remaining batches; replays the epoch's shuffle when resuming."""
        state = self.state
        loader = state.train_dataloader
        assert loader is not None
        generators = loader_generators(loader)
        set_sampler_epoch(loader, state.timestamp.epoch)  # a DistributedSampler shuffles by epoch
        skip = state.timestamp.batch_in_epoch
        if skip == 0:
            state.epoch_start_rng = capture_rng(generators)
            self.engine.run_event(Event.EPOCH_START)
            return iter(loader)
        now = capture_rng(generators)
        if state.epoch_start_rng is not None:
            restore_rng(state.epoch_start_rng, generators)
        iterator = iter(loader)
        for _ in range(skip):
            if next(iterator, None) is None:
                break
        restore_rng(now, generators)
        return iterator

    def _train_epoch(self) -> None:
        state = self.state
        ts = state.timestamp
        batches_before = ts.batch_in_epoch
        for batch in self._epoch_iterator():
            self._train_batch(batch)
            if state.is_done:
                break
        if ts.batch_in_epoch == 0 and batches_before == 0:
            raise ValueError("train_dataloader yielded no batches")
        epoch_complete = not state.is_done or (
            state.batches_per_epoch is not None and ts.batch_in_epoch >= state.batches_per_epoch
        )
        if epoch_complete:
            ts.advance_epoch()
            self.engine.run_event(Event.EPOCH_END)
            if self._eval_due(TimeUnit.EPOCH):
                self._run_eval()
            self.engine.run_event(Event.EPOCH_CHECKPOINT)

    def _train_batch(self, raw_batch: Any) -> None:
        state = self.state
        batch = to_device(raw_batch, self.device)
        state.batch = batch
        self.engine.run_event(Event.BATCH_START)
        for opt in state.optimizers:
            opt.zero_grad(set_to_none=True)
        outputs, loss, _ = forward_and_loss(state.model, batch, self.loss_fn)
        loss.backward()
        for opt in state.optimizers:
            opt.step()
        for sch in state.schedulers:
            sch.step()
        state.outputs, state.loss = outputs, loss.detach()
        tokens = batch_tokens(
            batch
        )  # summed over the ranks (their padding differs); every rank's batches have them or not
        if tokens and state.world_size > 1:
            tokens = int(all_reduce_sum([float(tokens)], state.device)[0])
        state.timestamp.advance_batch(batch_size(batch) * state.world_size, tokens)  # samples over all ranks
        loss_value = float(state.loss)
        if not math.isfinite(loss_value):
            warnings.warn(f"training loss is {loss_value} at batch {state.timestamp.batch}", stacklevel=2)
        self.logger.log_metrics({"train/loss": loss_value}, step=state.timestamp.batch)
        self.engine.run_event(Event.BATCH_END)
        if self._eval_due(TimeUnit.BATCH):
            self._run_eval()
        self.engine.run_event(Event.BATCH_CHECKPOINT)

    def _eval_due(self, unit: TimeUnit) -> bool:
        interval = self.eval_interval
        if interval is None or interval.unit != unit:
            return False
        return self.state.timestamp.get(unit) % int(interval.value) == 0

    def _run_eval(self) -> dict[str, float]:
        state = self.state
        assert state.eval_dataloader is not None
        self.engine.run_event(Event.EVAL_START)
        try:
            metrics = evaluate(
                state.model, state.eval_dataloader, self.loss_fn, self.device, all_reduce=state.world_size > 1
            )
            state.eval_metrics = metrics
            self.logger.log_metrics(metrics, step=state.timestamp.batch)
        finally:
            state.model.train()
            self.engine.run_event(Event.EVAL_END)  # puts the training weights back, even after an error
        return metrics

    def eval(self, dataloader: Iterable[Any] | None = None) -> dict[str, float]:
        """Evaluate now (on the EMA weights once an EMA has started) and return the metrics."""
        if dataloader is not None:
            state = self.state
            self.state.eval_dataloader = self._shard_loader(
                dataloader, "dataloader", state.world_size, state.rank, pad=False
            )
        if self.state.eval_dataloader is None:
            raise ValueError("no eval_dataloader: pass one to Trainer(...) or to eval()")
        was_training = self.state.model.training
        try:
            return self._run_eval()
        finally:
            self.state.model.train(was_training)
