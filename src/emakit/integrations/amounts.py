"""What each optimizer step saw, in samples and tokens, for the framework callbacks' ``'sp'`` and ``'tok'`` times.

A half-life in samples or tokens gives each update the weight of the amount seen since the previous update
(:class:`~emakit.averaging.schedules.PerAmount`), so the callbacks must tell the averager the amount of every
optimizer step. The rules, chosen once here:

- Lightning counts from each training batch: samples are ``count_samples(batch)`` if given, else the first
  dimension of the first tensor in the batch (Lightning's own ``extract_batch_size``); tokens are
  ``count_tokens(batch)`` if given, else a dict batch's ``attention_mask.sum()`` (padding left out) or, without a
  mask, ``input_ids.numel()`` (emakit's Trainer's rule, :func:`emakit.core.batches.batch_tokens`). The
  micro-batches of one optimizer step add up, and so do the data-parallel replicas (one all-reduce of two
  integers per optimizer step, only when the schedule counts samples or tokens).
- Transformers reads tokens from ``TrainerState.num_input_tokens_seen``, which the Trainer counts (summed over
  ranks) when ``TrainingArguments(include_num_input_tokens_seen=...)`` is on; it reports no samples.

An amount that cannot be known is refused before the first optimizer step, naming what to set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from emakit.averaging.schedules import Schedule
from emakit.core.batches import batch_tokens
from emakit.time import TimeUnit

__all__ = ["BatchAmounts", "Counter", "check_counter", "tokens_seen_setting", "trainer_counting_refusal"]

#: ``count_samples`` / ``count_tokens``: the samples or tokens of one batch.
Counter = Callable[[Any], int]


def check_counter(name: str, counter: Counter | None) -> Counter | None:
    """TypeError naming ``name`` when ``counter`` is neither None nor callable."""
    if counter is not None and not callable(counter):
        raise TypeError(f"{name} must be a function batch -> int or None, got {counter!r}")
    return counter


class BatchAmounts:
    """The samples and tokens of the batches since the last optimizer step, by the rules above (Lightning)."""

    def __init__(
        self,
        owner: str,
        schedule: Schedule,
        samples_of: Counter | None,
        tokens_of: Counter | None,
        default_samples: Counter,
    ) -> None:
        self.owner = owner
        self.counting = {unit: schedule.counts(unit) for unit in (TimeUnit.SAMPLE, TimeUnit.TOKEN)}
        self.description = schedule.describe()
        self.samples_of = samples_of or default_samples
        self.tokens_of = tokens_of
        self.samples = 0
        self.tokens = 0

    @property
    def needed(self) -> bool:
        """Whether the schedule counts samples or tokens at all (nothing is counted otherwise)."""
        return any(self.counting.values())

    def reset(self) -> None:
        self.samples = self.tokens = 0

    def add(self, batch: Any) -> None:
        """Count one (micro-)batch; refuse a token count of 0 without ``count_tokens`` (nothing to count from)."""
        if self.counting[TimeUnit.SAMPLE]:
            self.samples += _amount("count_samples", self.samples_of(batch))
        if self.counting[TimeUnit.TOKEN]:
            tokens = batch_tokens(batch) if self.tokens_of is None else _amount("count_tokens", self.tokens_of(batch))
            if self.tokens_of is None and not _holds_tokens(batch):
                raise ValueError(
                    f"{self.owner}: {self.description} counts tokens, and a {type(batch).__name__} batch holds no "
                    "'attention_mask' or 'input_ids' tensor to count them from: pass count_tokens=<a function "
                    "batch -> tokens> to the callback, or give the times in 'ba' or 'sp'"
                )
            self.tokens += tokens

    def take(self, world_size: int, replicas: int | None) -> tuple[int, int]:
        """The counts since the last call, summed over the ``world_size`` ranks (``replicas`` of them data-parallel,
        all if None: tensor-parallel ranks share a batch, so the sum counts it ``world_size // replicas`` times)."""
        samples, tokens = self.samples, self.tokens
        self.reset()
        if world_size > 1 and self.needed and torch.distributed.is_initialized():
            nccl = "nccl" in str(torch.distributed.get_backend())
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            both = torch.tensor([samples, tokens], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(both)
            shared = max(1, world_size // max(1, int(replicas or world_size)))
            samples, tokens = (int(v) // shared for v in both.tolist())
        return samples, tokens


def _holds_tokens(batch: Any) -> bool:
    """Whether ``batch`` is a mapping with an ``attention_mask`` or ``input_ids`` tensor (all padding counts 0)."""
    return isinstance(batch, Mapping) and any(
        isinstance(batch.get(key), torch.Tensor) for key in ("attention_mask", "input_ids")
    )


def _amount(name: str, value: Any) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}(batch) must return an int >= 0, got {value!r}")
    return value


def tokens_seen_setting(setting: Any) -> bool:
    """Whether ``TrainingArguments.include_num_input_tokens_seen`` makes the Trainer count tokens: ``True``
    (Transformers 4.47's bool), or ``"all"`` / ``"non_padding"`` (later releases; ``"no"`` is off)."""
    return setting is True or (isinstance(setting, str) and setting not in ("no", "False", "false"))


def trainer_counting_refusal(owner: str, schedule: Schedule, tokens_setting: Any) -> str | None:
    """Why the Transformers Trainer cannot tell ``schedule`` the amounts it counts, or None: it reports no samples,
    and tokens only with ``include_num_input_tokens_seen`` on (``tokens_setting``)."""
    if schedule.counts(TimeUnit.SAMPLE):
        return (
            f"{owner}: {schedule.describe()} counts samples, and the Transformers Trainer does not report how many "
            "samples each optimizer step saw; give the times in 'tok' (with TrainingArguments("
            "include_num_input_tokens_seen=True)), 'ba' (optimizer steps), 'ep' or 'dur'"
        )
    if schedule.counts(TimeUnit.TOKEN) and not tokens_seen_setting(tokens_setting):
        return (
            f"{owner}: {schedule.describe()} counts tokens, and the Trainer counts them only with "
            f"TrainingArguments(include_num_input_tokens_seen=True) (or, in releases that offer it, "
            f"'non_padding' to leave padding out), got include_num_input_tokens_seen={tokens_setting!r}"
        )
    return None
