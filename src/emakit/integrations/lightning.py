"""Lightning callbacks that drive an averager: ``Trainer(callbacks=[EMACallback(half_life="2000ba")])``.

:class:`AveragingCallback` holds any averager (:class:`emakit.EMA`, :class:`emakit.SWA`) and maps Lightning's
events onto its verbs, and nothing else; :class:`EMACallback` and :class:`SWACallback` only build the averager
from their arguments (the averager's own, plus the callback's keyword-only ones):

==================================================  ==============================================================
``setup``                                           refuse strategies the EMA cannot follow (before training)
``on_fit_start``                                    ``ema.attach(model)`` (after Lightning moved and wrapped it), then
                                                    the EMA state a resumed checkpoint carried
``on_train_start``                                  ``ema.set_duration(...)`` from ``max_steps`` or ``max_epochs``
                                                    (in batches that step: manual optimization may step twice)
``on_train_batch_start``                            the batch's samples / tokens counted (``'sp'`` / ``'tok'``)
``on_train_batch_end``, if ``global_step`` grew     ``ema.step(samples, tokens)``: one per optimizer step, not per
                                                    micro-batch, then ``finish_window`` (BatchNorm once it closed)
``on_train_epoch_end``                              ``ema.epoch_end()``, then ``finish_window``
``on_{validation,test,predict}_start`` / ``_end``   ``ema.average_parameters()`` entered / left (no swap before the
                                                    average has started; training weights back bit for bit)
``on_save_checkpoint``                              ``state_dict`` <- ``ema.published_model_state``, the training
                                                    weights beside it under ``"training_state_dict"`` (sharded:
                                                    inside ``state_dict``, see :data:`SHARDED_STATE_KEY`)
``on_load_checkpoint`` / ``load_state_dict``        training weights back into the model, ``ema.load_state_dict``
``on_fit_end``                                      ``finish_window(end_of_training=True)``; with
                                                    ``weights_after_fit="ema"``: the average into the model
==================================================  ==============================================================

Importing this module imports Lightning (``lightning.pytorch``, else the standalone ``pytorch_lightning``);
``import emakit`` never does. Install it with ``pip install "emakit[lightning]"``.
"""

from __future__ import annotations

import contextlib
import multiprocessing.context
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Literal, final

from emakit.averaging import EMA, SWA, Averager
from emakit.averaging.batchnorm import default_bn_forward
from emakit.checkpoint.sharded import LIGHTNING_EMA_KEY, is_sharded_checkpoint, read_sharded_checkpoint
from emakit.engine.naming import canonical_name, unwrap_model
from emakit.integrations.amounts import BatchAmounts, Counter, check_counter
from emakit.integrations.arguments import derived_signature, keyword
from emakit.integrations.lightning_strategies import averaging_conflict, launcher_refusal, strategy_refusal
from emakit.parallel.sharding import reshard_model
from emakit.time import Time, TimeUnit

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from lightning.pytorch.utilities import move_data_to_device
    from lightning.pytorch.utilities.data import extract_batch_size
except ImportError:  # pragma: no cover - the standalone package of the same code
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.callbacks import Callback, ModelCheckpoint  # type: ignore[assignment]
        from pytorch_lightning.strategies import ModelParallelStrategy  # type: ignore[assignment]
        from pytorch_lightning.utilities import move_data_to_device
        from pytorch_lightning.utilities.data import extract_batch_size
    except ImportError as error:
        raise ImportError(
            "emakit.integrations.lightning needs Lightning 2.x: pip install 'emakit[lightning]' (or lightning>=2.6)"
        ) from error

__all__ = ["SHARDED_STATE_KEY", "TRAINING_STATE_KEY", "AveragingCallback", "EMACallback", "SWACallback"]

#: Top-level checkpoint key holding the training weights (the model's own ``state_dict`` keys) once the
#: average has started; ``checkpoint["state_dict"]`` then holds the EMA weights.
TRAINING_STATE_KEY = "training_state_dict"
#: Under ModelParallelStrategy, the entry of ``checkpoint["state_dict"]`` (which Lightning saves with
#: torch.distributed.checkpoint, every rank its shards) holding ``{"training": the training weights,
#: "ema": the average, "more_averages": [...]}``: sharded tensors cannot go to the rank-0 metadata file.
SHARDED_STATE_KEY = LIGHTNING_EMA_KEY
_SHARDED_MARK = "tensors_in_state_dict"

_WEIGHTS_AFTER_FIT = ("training", "ema")
#: The callbacks' own keyword arguments, after the averager's.
_AFTER_FIT = keyword("weights_after_fit", "training", Literal["training", "ema"])
_COUNTERS = [keyword("count_samples", None), keyword("count_tokens", None)]


def _keyed_like(values: Mapping[str, Any], keys: Mapping[str, str], like: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """``values`` (canonical names) under the model's own state_dict ``keys``, in ``like``'s order and metadata."""
    out: OrderedDict[str, Any] = OrderedDict((key, values[keys[key]]) for key in like)
    metadata = getattr(like, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]  # module versions, read by load_state_dict
    return out


class AveragingCallback(Callback):
    """Keep an averager of a LightningModule's weights, evaluate and checkpoint with it.

    ``AveragingCallback(EMA(half_life="2000ba"))`` or ``AveragingCallback(SWA(swa_start="3ep"))``; the
    :class:`EMACallback` and :class:`SWACallback` subclasses only build the averager from their arguments. Its
    times count Lightning's progress: ``'ba'`` counts optimizer steps (with ``accumulate_grad_batches=N``, one per
    N batches), ``'ep'`` epochs, ``'sp'`` samples and ``'tok'`` tokens (of every data-parallel replica, counted from
    each batch: :mod:`emakit.integrations.amounts`) and ``'dur'`` a fraction of ``max_steps`` (if set) or else
    ``max_epochs``. The averager is :attr:`averager`.

    What it guarantees:

    - The average is blended after every optimizer step (``update_interval``); integer buffers are copied.
    - Validation, test and predict loops run on the averaged weights once the average has started, on the
      training weights before (no untrained copy is ever swapped in). The training weights are put back
      bit for bit afterwards, also when the loop raises.
    - Checkpoints hold the averaged weights as ``state_dict``, so ``MyModule.load_from_checkpoint(path)`` is
      the averaged model, and the training weights under ``checkpoint["training_state_dict"]`` and the
      averager's state under ``checkpoint["callbacks"]["EMACallback"]`` (``"SWACallback"`` for an SWA), so
      ``trainer.fit(model, ckpt_path=path)`` resumes both exactly. Before the average starts ``state_dict``
      holds the training weights.
    - ``trainer.validate/test/predict(ckpt_path=...)`` evaluate the checkpoint's ``state_dict`` as loaded.
    - When the averager's window closes (an SWA's ``swa_end``, or the end of ``fit``), its BatchNorm statistics
      are recomputed over the training data (``bn_forward(module, batch)`` runs one batch, already on the
      module's device; default: the module on the batch's first element when it is a list or tuple, else on
      the batch).

    Args:
        averager: the :class:`emakit.EMA` or :class:`emakit.SWA` to drive.
        weights_after_fit: which weights the module holds when ``fit`` returns. ``"training"`` (default): the
            optimizer's, so a further ``fit`` continues training where it stopped, and ``trainer.validate``,
            ``test``, ``predict`` and checkpoints still use the average; ``callback.averager.ema_model`` is the
            averaged module. ``"ema"``: the average is copied into the module (as Lightning's
            ``EMAWeightAveraging`` does), for code that uses ``model`` right after ``fit``; the training
            weights are then only in the checkpoints.
        bn_forward: runs one training batch for the BatchNorm pass (see above).
        count_samples: ``count_samples(batch)``, a batch's samples, for ``'sp'`` times (the default rule and the
            refusals: :mod:`emakit.integrations.amounts`).
        count_tokens: ``count_tokens(batch)``, a batch's tokens, for ``'tok'`` times (likewise).

    Strategies: one device and ``strategy="ddp"`` (each rank keeps an identical average, no communication),
    and ``ModelParallelStrategy`` (FSDP2 ``fully_shard`` and/or tensor parallelism in ``configure_model``):
    each rank averages its own shards of the DTensor parameters, whatever their placements, with no
    communication per update; validation swaps shards in place; the checkpoint folder holds the average as
    ``state_dict`` and, under ``state_dict["emakit:ema"]``, the training weights and the averager's tensors, every
    rank writing its shards (:func:`emakit.export_ema_weights` writes the average whole). FSDPStrategy (FSDP1),
    DeepSpeed and the spawn/fork launchers (which would leave :attr:`averager` untouched in the calling process)
    are refused before training starts. One averaging callback per Trainer.
    """

    def __init__(
        self,
        averager: Averager,
        *,
        weights_after_fit: Literal["training", "ema"] = "training",
        bn_forward: Callable[[Any, Any], Any] | None = None,
        count_samples: Counter | None = None,
        count_tokens: Counter | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(averager, Averager):
            raise TypeError(f"averager must be an emakit averager (EMA, SWA), got {type(averager).__name__}")
        #: The averager this callback drives; its checks name the argument and value of any bad hyperparameter.
        self.averager = averager
        if weights_after_fit not in _WEIGHTS_AFTER_FIT:
            raise ValueError(f"weights_after_fit must be 'training' or 'ema', got {weights_after_fit!r}")
        self.weights_after_fit = weights_after_fit
        self.bn_forward = bn_forward
        counters = (check_counter("count_samples", count_samples), check_counter("count_tokens", count_tokens))
        self._amounts = BatchAmounts(type(self).__name__, averager.schedule, *counters, extract_batch_size)
        self._attached = False
        #: on_fit_start has run in this fit (ModelParallelStrategy restores checkpoints after it, DDP before).
        self._fit_started = False
        self._last_global_step = 0
        self._max_steps: int | None = None  # max_steps, when it sets the training length
        #: State read from a checkpoint before the model is ready (Lightning restores callbacks before
        #: it moves the model to its device); loaded at on_fit_start, after attach.
        self._pending_state: Mapping[str, Any] | None = None
        #: The stage a checkpoint is being restored for: "fit" loads the averager, others evaluate the checkpoint.
        self._restoring_for_fit: bool | None = None
        #: validate/test/predict(ckpt_path=...): the module holds the checkpoint's weights; no swap.
        self._evaluating_checkpoint = False
        self._swap: contextlib.ExitStack | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.averager!r}, weights_after_fit={self.weights_after_fit!r})"

    @property
    def state_key(self) -> str:
        """``"EMACallback"`` for an EMA, ``"SWACallback"`` for an SWA: independent of the hyperparameters, so that a
        resume with a changed half-life finds its state."""
        return f"{type(self.averager).__name__}Callback"

    def __getstate__(self) -> dict[str, Any]:
        """Refuse, in the calling process, to be pickled for a spawn launcher's children (``strategy='ddp_spawn'``):
        no hook runs before the launcher, and ``setup`` would fail in the children with the error buried in their
        tracebacks. A forking launcher pickles nothing: there ``setup`` refuses, in the children."""
        if multiprocessing.context.get_spawning_popen() is not None:
            raise ValueError(launcher_refusal("DDPStrategy"))
        return self.__dict__.copy()

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refusal = strategy_refusal(trainer.strategy)
        if refusal is not None:
            raise ValueError(refusal)
        conflict = averaging_conflict(self, trainer.callbacks, AveragingCallback)  # type: ignore[attr-defined]
        if conflict is not None:
            raise ValueError(conflict)
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if stage == "fit" and isinstance(callback, ModelCheckpoint) and callback.save_weights_only:
                warnings.warn(
                    "ModelCheckpoint(save_weights_only=True) writes the module's weights without calling "
                    "callbacks, so its files hold the training weights, not the EMA; save full checkpoints to get "
                    "the EMA weights as state_dict",
                    stacklevel=2,
                )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.averager.attach(pl_module)
        self._attached = True
        self._fit_started = True
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.averager.load_state_dict(state)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_global_step = trainer.global_step
        self._amounts.reset()
        max_duration, batches_per_epoch = self._training_length(trainer)
        self._max_steps = trainer.max_steps if max_duration is not None and max_duration.endswith("ba") else None
        # after a resume, also counts the end of an epoch whose last batch the checkpoint was written at
        self.averager.set_duration(max_duration, batches_per_epoch)
        schedule = self.averager.schedule
        for name, time in ((schedule.start_argument, schedule.start), (schedule.end_argument, schedule.end)):
            if max_duration is None and time is not None and time.unit == TimeUnit.DURATION and time.value > 0:
                raise ValueError(
                    f"{name}='{time}' is a fraction of the training length, but this Trainer has none (max_steps=-1 "
                    f"and max_epochs=-1): set max_steps or max_epochs, or give {name} in 'ba' or 'ep'"
                )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning may know the epoch's length only now (its loaders are set up after on_train_start)
        if self.averager.batches_per_epoch is None and self._follows(pl_module):
            self.averager.set_duration(None, self._training_length(trainer)[1])

    @staticmethod
    def _training_length(trainer: pl.Trainer) -> tuple[str | None, int | None]:
        """``max_steps`` as ``'Nba'`` if set, else ``max_epochs`` as ``'Nep'`` with optimizer steps per epoch."""
        num_batches = trainer.num_training_batches
        per_epoch = None
        if isinstance(num_batches, int) or (isinstance(num_batches, float) and num_batches != float("inf")):
            per_epoch = -(-int(num_batches) // max(1, trainer.accumulate_grad_batches))
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return f"{trainer.max_steps}ba", per_epoch
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            return f"{trainer.max_epochs}ep", per_epoch
        return None, per_epoch

    # ------------------------------------------------------------------ training
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._amounts.add(batch)  # before the forward: an uncountable batch is refused before any step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step counts optimizer steps: it stays put while gradients accumulate, and under manual
        # optimization a batch that steps several optimizers is one update of the average.
        if trainer.global_step > self._last_global_step:
            steps = trainer.global_step - self._last_global_step
            self._last_global_step = trainer.global_step
            replicas = (getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}).get("num_replicas")
            samples, tokens = self._amounts.take(trainer.world_size, replicas)
            if steps > 1 and self._max_steps is not None:
                # max_steps counts optimizer steps, the EMA's clock batches that stepped: the length in batches
                left = -(-(self._max_steps - trainer.global_step) // steps)
                length = Time(self.averager.timestamp.batch + 1 + max(left, 0), TimeUnit.BATCH)
                start = self.averager.schedule.start
                if not (start.unit == TimeUnit.BATCH and start > length):
                    self.averager.set_duration(length)
            self.averager.step(samples, tokens)
            self._finish_window(trainer, pl_module, end_of_training=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.averager.epoch_end()
        self._finish_window(trainer, pl_module, end_of_training=False)

    def _finish_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule, end_of_training: bool) -> None:
        """BatchNorm of the average over the training data, once its window has closed."""
        if not self._follows(pl_module):
            return
        run = self.bn_forward

        def forward(module: Any, batch: Any) -> None:
            batch = move_data_to_device(batch, pl_module.device)
            if run is None:
                default_bn_forward(module, batch)
            else:
                run(module, batch)

        loader = trainer.train_dataloader
        self.averager.finish_window(loader, pl_module, forward, end_of_training=end_of_training)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_window(trainer, pl_module, end_of_training=True)
        self.averager.wait()
        if self.weights_after_fit == "ema" and self.averager.started and self._follows(pl_module):
            if isinstance(trainer.strategy, ModelParallelStrategy):  # its load_model_state_dict does nothing
                reshard_model(pl_module)  # each rank copies its own shards of the average
                pl_module.load_state_dict(self._published(pl_module.state_dict()), strict=True)
            else:
                published = self._published(pl_module.state_dict())
                trainer.strategy.load_model_state_dict({"state_dict": published}, strict=True)

    # ------------------------------------------------------------------ evaluation on the EMA weights
    def _follows(self, pl_module: pl.LightningModule) -> bool:
        return self._attached and unwrap_model(self.averager.model) is unwrap_model(pl_module)

    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        if self._swap is not None or self._evaluating_checkpoint or not self._follows(pl_module):
            return
        stack = contextlib.ExitStack()
        stack.enter_context(self.averager.average_parameters(pl_module))
        self._swap = stack

    def _swap_back(self) -> None:
        if self._swap is not None:
            stack, self._swap = self._swap, None
            stack.close()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_back()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_back()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_back()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap_back()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._swap_back()
        self._evaluating_checkpoint = False
        self._restoring_for_fit = None
        self._fit_started = False

    # ------------------------------------------------------------------ checkpoints
    def _published(self, model_state: Mapping[str, Any]) -> OrderedDict[str, Any]:
        """The module's ``state_dict`` with the average for the tracked tensors, under the module's keys."""
        keys = {key: canonical_name(key) for key in model_state}
        canonical = {keys[key]: value for key, value in model_state.items()}
        return _keyed_like(self.averager.published_model_state(canonical), keys, model_state)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.averager.state_dict()}

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self._follows(pl_module):
            return
        model_state = checkpoint["state_dict"]
        keys = {key: canonical_name(key) for key in model_state}
        canonical = {keys[key]: value for key, value in model_state.items()}
        # The training weights even if a loop saves while the EMA weights are swapped in.
        training = _keyed_like(self.averager.training_model_state(canonical), keys, model_state)
        if not self.averager.started:
            checkpoint["state_dict"] = training
            return
        published = _keyed_like(self.averager.published_model_state(canonical), keys, model_state)
        if isinstance(trainer.strategy, ModelParallelStrategy):
            published[SHARDED_STATE_KEY] = self._sharded_tensors(checkpoint, training)
        else:
            checkpoint[TRAINING_STATE_KEY] = training
        checkpoint["state_dict"] = published

    def _sharded_tensors(self, checkpoint: dict[str, Any], training: Mapping[str, Any]) -> dict[str, Any]:
        """The training weights and the EMA's tensors (DTensors), moved out of the callback's state, which
        Lightning writes to the rank-0 metadata file; they go into the checkpoint folder with the weights."""
        if SHARDED_STATE_KEY in training:
            raise ValueError(
                f"the module has a tensor named {SHARDED_STATE_KEY!r}, the key {self.state_key} saves under"
            )
        callbacks = checkpoint.setdefault("callbacks", {})
        ema_state = dict(callbacks.get(self.state_key, self.state_dict())["ema"])
        tensors = {"training": dict(training), "ema": ema_state["ema"]}
        if ema_state.get("more_averages"):
            tensors["more_averages"] = list(ema_state["more_averages"])
        callbacks[self.state_key] = {"ema": {**ema_state, "ema": None, "more_averages": []}, _SHARDED_MARK: True}
        return tensors

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning has just loaded checkpoint["state_dict"] (the EMA weights) into the module.
        self._restoring_for_fit = trainer.state.fn == "fit"
        if not self._restoring_for_fit:
            self._evaluating_checkpoint = True
            return
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if isinstance(state, dict) and state.get(_SHARDED_MARK):
            self._load_sharded(trainer, pl_module, state)
        training = checkpoint.get(TRAINING_STATE_KEY)
        if training is not None:
            trainer.strategy.load_model_state_dict({"state_dict": training}, strict=pl_module.strict_loading)
        if state is None:
            warnings.warn(
                f"the checkpoint holds no {self.state_key} state: the average starts afresh from the resumed weights, "
                f"its clock ({self.averager.schedule.start_argument}, 'dur') counting from this resume",
                stacklevel=2,
            )

    def _load_sharded(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any]) -> None:
        """Read this rank's shards of the training weights and the EMA from the checkpoint folder (no collective):
        the training weights into the module, the EMA's tensors back into ``state`` for :meth:`load_state_dict`."""
        path = trainer.ckpt_path
        if path is None or not is_sharded_checkpoint(path):
            raise ValueError(
                f"the {self.state_key} state says its tensors are in a distributed checkpoint folder, but {path!r} is "
                "not one"
            )
        reshard_model(pl_module)
        found = read_sharded_checkpoint(
            path, pl_module, keep=lambda keys: keys[:2] == ("state_dict", SHARDED_STATE_KEY)
        )
        tensors = found.get("state_dict", {}).get(SHARDED_STATE_KEY)
        if not isinstance(tensors, Mapping) or not isinstance(tensors.get("training"), Mapping):
            raise ValueError(f"checkpoint {str(path)!r} holds no {SHARDED_STATE_KEY!r} entry in its state_dict")
        pl_module.load_state_dict(tensors["training"], strict=pl_module.strict_loading)
        state["ema"] = {**state["ema"], "ema": tensors.get("ema"), "more_averages": tensors.get("more_averages") or []}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._restoring_for_fit is False:  # evaluating a checkpoint: the live average stays as it is
            return
        state = state_dict.get("ema")
        if not isinstance(state, Mapping):
            raise ValueError(
                f"{self.state_key} state must hold the averager's state under 'ema', got keys {sorted(state_dict)}"
            )
        if self._restoring_for_fit and self._fit_started:
            self.averager.load_state_dict(state)  # restored after setup: the module is sharded and attached
        elif self._restoring_for_fit or not self._attached:
            self._pending_state = state  # the module is not on its device yet; loaded at on_fit_start
        else:
            self.averager.load_state_dict(state)


@final
class EMACallback(AveragingCallback):
    """An :class:`AveragingCallback` driving ``EMA(...)``: every argument but the callback's own (``weights_after_fit``,
    ``count_samples``, ``count_tokens``) is :class:`emakit.EMA`'s, under the same name, with its default and its
    checks. Post-hoc snapshots are written by rank 0 and continued without gap or duplicate on resume. The EMA is
    :attr:`averager`."""

    @derived_signature(EMA, [_AFTER_FIT, *_COUNTERS])
    def __init__(
        self,
        *args: Any,
        weights_after_fit: Literal["training", "ema"] = "training",
        count_samples: Counter | None = None,
        count_tokens: Counter | None = None,
        **kwargs: Any,
    ) -> None:
        ema = EMA(*args, **kwargs)
        super().__init__(
            ema, weights_after_fit=weights_after_fit, count_samples=count_samples, count_tokens=count_tokens
        )


@final
class SWACallback(AveragingCallback):
    """An :class:`AveragingCallback` driving ``SWA(...)``: every argument but ``bn_forward`` and
    ``weights_after_fit`` is :class:`emakit.SWA`'s. Lightning's own learning-rate schedulers stay in charge of
    the rate: for torch's ``SWALR``, return it from ``configure_optimizers``. The SWA is :attr:`averager`."""

    @derived_signature(SWA, [keyword("bn_forward", None), _AFTER_FIT, *_COUNTERS])
    def __init__(
        self,
        *args: Any,
        bn_forward: Callable[[Any, Any], Any] | None = None,
        weights_after_fit: Literal["training", "ema"] = "training",
        count_samples: Counter | None = None,
        count_tokens: Counter | None = None,
        **kwargs: Any,
    ) -> None:
        swa = SWA(*args, **kwargs)
        if swa.swa_lr is not None:
            raise ValueError(
                f"SWACallback(swa_lr={swa.swa_lr!r}): swa_lr is the learning rate emakit's Trainer sets; under "
                "Lightning the schedulers you return from configure_optimizers set it (torch's SWALR for SWA's)"
            )
        super().__init__(swa, weights_after_fit=weights_after_fit, bn_forward=bn_forward, count_samples=count_samples,
                         count_tokens=count_tokens)  # fmt: skip
