"""The demo's settings and their checks, without torch.

``emakit demo --help`` shows these defaults and the command line checks the time options with
:func:`check_time_option` before anything imports torch, so help and argument errors answer at once.
:mod:`emakit.demo.run` uses the same :class:`DemoConfig`, :class:`OptionError` and checks, so each
default and each rule is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from emakit.time import Time, TimeUnit

__all__ = ["RUN_FILES", "DemoConfig", "OptionError", "check_time_option"]

#: What a demo run writes into its folder; a folder holding any of them holds a run, which the demo never replaces.
RUN_FILES = ("metrics.jsonl", "curves.png", "ema_weights.safetensors", "summary.json", "checkpoints")


class OptionError(ValueError):
    """A bad demo setting; ``option`` is the command-line option it came from (e.g. ``'--half-life'``)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


@dataclass
class DemoConfig:
    """The demo's settings; the defaults are the ones ``emakit demo`` runs with.

    The defaults make SGD deliberately noisy (a high learning rate, no momentum, batches of 16) so that
    the raw validation curve jumps from evaluation to evaluation, and evaluate every 5 batches so the
    jumps are visible. 5 epochs of the digits' 1,437 training images are 445 batches; a 20-batch half-life
    averages over the last ~30 batches' weights (the mean age of an EMA weight is ``half_life / ln 2``),
    short enough for the EMA to follow training, long enough to smooth the jumps.
    """

    out: Path
    epochs: int = 5
    half_life: str = "20ba"
    update_interval: str | None = None
    ema_start: str = "0.0dur"
    lr: float = 0.8
    batch_size: int = 16
    eval_interval: int = 5
    seed: int = 0
    device: str = "cpu"
    threads: int | None = 1
    data: str | None = None
    plot: bool = True
    progress: bool = True


_UNIT_NAMES = {TimeUnit.BATCH: "batches", TimeUnit.EPOCH: "epochs", TimeUnit.SAMPLE: "samples"}


def check_time_option(value: str, option: str, units: Sequence[TimeUnit], *, allow_zero: bool = False) -> Time:
    """Parse a time option such as ``--half-life 20ba``: in one of ``units``, not negative, > 0 unless ``allow_zero``.

    Raises:
        OptionError: naming ``option``; a bare number (``--half-life 20``) is told which units it may take.
    """
    try:
        float(value)
    except (TypeError, ValueError):
        pass
    else:
        accepted = ", ".join(f"'{u.value}' ({_UNIT_NAMES.get(u, 'fraction of the run')})" for u in units)
        raise OptionError(option, f"{value!r} needs a unit, one of {accepted}; e.g. '20ba'")
    try:
        return Time.coerce(value, option, units, positive=not allow_zero)
    except (ValueError, TypeError) as e:
        # Time.coerce words its errors "<option>: ..." or "<option> must/cannot ..."
        raise OptionError(option, str(e).removeprefix(option).removeprefix(":").lstrip()) from None
