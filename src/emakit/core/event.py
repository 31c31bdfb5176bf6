"""Events: the named moments of the training loop at which algorithms and callbacks run."""

from __future__ import annotations

from enum import Enum

__all__ = ["Event"]


class Event(str, Enum):
    """Points in :class:`emakit.trainer.Trainer`'s loop. At each event algorithms run first, then callbacks.

    The loop, as pseudocode::

        INIT                                  # Trainer.__init__: model on its device, before optimizers exist
        [load checkpoint]; AFTER_LOAD         # only with load_path
        FIT_START
        while not done:
            EPOCH_START                       # not fired again when resuming inside an epoch
            for batch in train_dataloader:    # batches already trained in this epoch are skipped on resume
                BATCH_START
                loss = loss_fn(model(inputs), targets)
                loss.backward(); optimizer.step(); optimizer.zero_grad(); scheduler.step()
                timestamp.batch += 1          # batches count from 1 at BATCH_END
                BATCH_END                     # EMA with 'ba' units initialises/blends here
                if eval due ('Nba'):  EVAL_START; evaluate; EVAL_END
                BATCH_CHECKPOINT              # CheckpointSaver with 'Nba' interval
                if max_duration reached: break
            if the epoch ran to its end:
                timestamp.epoch += 1
                EPOCH_END                     # EMA with 'ep' units initialises/blends here
                if eval due ('Nep'):  EVAL_START; evaluate; EVAL_END
                EPOCH_CHECKPOINT              # CheckpointSaver with 'Nep' interval
        FIT_END                               # the model holds the training weights after this

    ``Trainer.eval()`` fires EVAL_START and EVAL_END around its loop as well. Between EVAL_START and
    EVAL_END the model may hold other weights (the EMA's); everywhere else it holds the training weights.
    """

    INIT = "init"
    AFTER_LOAD = "after_load"
    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    BATCH_START = "batch_start"
    BATCH_END = "batch_end"
    EPOCH_END = "epoch_end"
    EVAL_START = "eval_start"
    EVAL_END = "eval_end"
    BATCH_CHECKPOINT = "batch_checkpoint"
    EPOCH_CHECKPOINT = "epoch_checkpoint"
    FIT_END = "fit_end"
