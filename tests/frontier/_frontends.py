"""The rules run through the framework callbacks (Lightning, Transformers): a batch ramp of dict batches with
padding, and each rule's float64 oracle over the training weights recorded after every optimizer step.

The amounts each step saw are computed here from the data and the ramp (not from anything the callbacks report).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from _oracle import Weights, bema_oracle, corrected, ema_oracle, torchtitan_decay

from emakit import BEMA, EMA
from emakit.averaging import Averager

#: Samples per optimizer step within each epoch: the batch doubles twice.
RAMP = [8, 8, 16, 16, 32, 32]
SEQ = 6


def ramp_batches(offset: int = 0) -> list[list[int]]:
    """The index lists of one epoch (a ``batch_sampler``): consecutive samples, in RAMP's sizes."""
    out, start = [], offset
    for size in RAMP:
        out.append(list(range(start, start + size)))
        start += size
    return out


def token_data(vocab: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """``sum(RAMP)`` sequences of ``SEQ`` tokens, each padded after a random length of 1 to ``SEQ``."""
    g = torch.Generator().manual_seed(seed)
    n = sum(RAMP)
    lengths = torch.randint(1, SEQ + 1, (n,), generator=g)
    return {
        "input_ids": torch.randint(1, vocab, (n, SEQ), generator=g),
        "attention_mask": (torch.arange(SEQ) < lengths[:, None]).long(),
        "target": torch.randn(n, generator=g),
    }


def amounts(data: dict[str, torch.Tensor], epochs: int, padding_counts: bool) -> tuple[list[int], list[int]]:
    """Samples and tokens of each optimizer step over ``epochs`` epochs: tokens are the mask's ones, or every
    position when ``padding_counts``."""
    samples, tokens = [], []
    for _ in range(epochs):
        for indices in ramp_batches():
            samples.append(len(indices))
            mask = data["attention_mask"][indices]
            tokens.append(mask.numel() if padding_counts else int(mask.sum()))
    return samples, tokens


@dataclass(frozen=True)
class Rule:
    """A rule, how to build its averager, and its evaluated weights at the end from the recorded weights
    (``recorded[k]``: after optimizer step ``k``, ``recorded[0]`` before training) and each step's amounts."""

    name: str
    make: Callable[[], Averager]
    oracle: Callable[[Sequence[Weights], list[int], list[int]], Weights]


def _per_amount(half_life: float, which: int) -> Callable[[Sequence[Weights], list[int], list[int]], Weights]:
    def oracle(recorded: Sequence[Weights], samples: list[int], tokens: list[int]) -> Weights:
        seen = (samples, tokens)[which]  # one update a step: the n-th model comes at step n
        return ema_oracle(recorded, lambda n: 1 - 2 ** (-seen[n - 1] / half_life))

    return oracle


RULES = {
    "bema": Rule(
        "bema",
        lambda: BEMA(rho=5.0, gamma=1.5, kappa=0.6, eta=0.3, update_interval="2ba"),
        lambda recorded, _s, _t: corrected(bema_oracle(recorded, 5.0, 1.5, 0.6, 0.3, 1, 2)[-1], recorded[-1]),
    ),
    "half_life_fraction": Rule(
        "half_life_fraction",
        lambda: EMA(half_life_fraction=0.2),
        lambda recorded, _s, _t: ema_oracle(recorded, lambda n: 1 - torchtitan_decay(0.2, n)),
    ),
    "tokens": Rule("tokens", lambda: EMA(half_life="300tok"), _per_amount(300, 1)),
    "samples": Rule("samples", lambda: EMA(half_life="40sp"), _per_amount(40, 0)),
}
