"""The token clock: 'tok' times, token counts in the Timestamp, and half-lives in samples or tokens whose update
weights follow the amount seen since the previous update, against a float64 oracle under a batch ramp."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from _oracle import ema_oracle, max_error, record, tiny_model, train
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from emakit import EMA, Time, Timestamp
from emakit.core import Callback, Event
from emakit.core.batches import batch_tokens
from emakit.trainer import Trainer

RAMP = [8] * 6 + [16] * 6 + [32] * 6  # samples per step: the batch doubles twice


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.tuples(st.integers(0, 64), st.integers(0, 10**6))), max_size=50))
def test_property_token_counts_match_a_naive_counter_and_round_trip(steps: list[tuple[int, int] | None]) -> None:
    ts = Timestamp()
    token = token_in_epoch = sample = 0
    for step in steps:
        if step is None:
            ts.advance_epoch()
            token_in_epoch = 0
        else:
            ts.advance_batch(*step)
            sample, token, token_in_epoch = sample + step[0], token + step[1], token_in_epoch + step[1]
    assert (ts.sample, ts.token, ts.token_in_epoch, ts.get("tok")) == (sample, token, token_in_epoch, token)
    restored = Timestamp()
    restored.load_state_dict(ts.state_dict())
    assert restored == ts


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**15))
def test_property_tok_times_parse_and_print_back(value: int) -> None:
    time = Time.parse(f"{value}tok")
    assert (time.value, time.unit.value) == (value, "tok")
    assert Time.parse(str(time)) == time


def test_a_state_from_before_tokens_were_counted_resumes_with_zero_tokens() -> None:
    old = {"epoch": 1, "batch": 9, "sample": 99, "batch_in_epoch": 3, "sample_in_epoch": 33}
    ts = Timestamp()
    ts.load_state_dict(old)
    assert (ts.batch, ts.token, ts.token_in_epoch) == (9, 0, 0)


@pytest.mark.parametrize(("unit", "every"), [("sp", 1), ("sp", 2), ("tok", 1), ("tok", 3)])
def test_each_update_weighs_the_amount_seen_since_the_last_under_a_batch_ramp(unit: str, every: int) -> None:
    tokens = [b * (7 + i % 5) for i, b in enumerate(RAMP)]  # sequences of varying length
    amounts = RAMP if unit == "sp" else tokens
    half_life = 40 if unit == "sp" else 300
    ema = EMA(half_life=[f"{half_life}{unit}", f"{3 * half_life}{unit}"], update_interval=f"{every}ba")
    _, recorded = train(ema, len(RAMP), batches=RAMP, tokens=tokens)
    seen_before = [sum(amounts[:step]) for step in range(len(RAMP) + 1)]  # after `step` steps
    for j, h in enumerate((half_life, 3 * half_life)):
        updates = [step for step in range(2, len(recorded)) if step % every == 0]
        previous = {s: ([1, *updates])[i] for i, s in enumerate(updates)}
        weight = {  # n = models in the average after that update
            n: 1 - 2 ** (-(seen_before[s] - seen_before[previous[s]]) / h) for n, s in enumerate(updates, start=2)
        }
        ema.eval_average = j
        error = max_error(ema.ema_tensors, ema_oracle(recorded, weight.__getitem__, every=every))
        print(f"half_life={h}{unit}, update every {every}ba, batch 8->16->32: max |ema - oracle| = {error:.2e}")
        assert error < 2e-6


def test_a_constant_per_step_weight_would_drift_from_the_ramp() -> None:
    """What the amount clock is for: with the batch ramp, a per-step half-life gives another average."""
    by_amount, by_step = EMA(half_life="40sp"), EMA(half_life="5ba")
    train(by_amount, len(RAMP), batches=RAMP)
    train(by_step, len(RAMP), batches=RAMP)
    assert max_error(by_amount.ema_tensors, {k: v.double() for k, v in by_step.ema_tensors.items()}) > 1e-4


def test_resume_mid_run_is_bitwise() -> None:
    ema = EMA(half_life="100tok", update_interval="2ba")
    tokens = [5 * (i + 1) for i in range(16)]
    model, _ = train(ema, 7, tokens=tokens)
    saved, saved_model = copy.deepcopy(ema.state_dict()), copy.deepcopy(model)
    assert saved["amount_at_update"] == sum(tokens[:6])
    train(ema, 9, model=model, start=7, tokens=tokens)
    resumed = EMA(half_life="100tok", update_interval="2ba")
    resumed.attach(saved_model)
    resumed.load_state_dict(saved)
    train(resumed, 9, model=saved_model, start=7, tokens=tokens)
    for name, tensor in ema.ema_tensors.items():
        assert torch.equal(tensor, resumed.ema_tensors[name]), name


def test_a_step_without_the_amount_is_refused_naming_the_argument() -> None:
    ema = EMA(half_life="100tok")
    ema.attach(tiny_model())
    with pytest.raises(ValueError, match=r"half-life in tokens .* call step\(num_tokens=\.\.\.\) \(got num_tokens=0\)"):
        ema.step(num_samples=8)
    with pytest.raises(ValueError, match=r"update_interval: got '10tok'; accepted units: 'ba', 'ep'"):
        EMA(half_life="100tok", update_interval="10tok")
    with pytest.raises(ValueError, match=r"warmup applies to half-lives in 'ba' or 'ep', got half_life='10sp'"):
        EMA(half_life="10sp", warmup=True)


class TokenModel(nn.Module):
    """A tiny language-model-like module over dict batches: the Trainer hands it the whole batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return self.head((self.embed(batch["input_ids"]) * mask).sum(1) / mask.sum(1))

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (outputs.squeeze(-1) - batch["target"]).pow(2).mean()


def token_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for i, size in enumerate(RAMP):
        ids = torch.randint(0, 16, (size, 6), generator=g)
        lengths = torch.randint(1, 7, (size,), generator=g)
        mask = (torch.arange(6) < lengths[:, None]).long()
        batches.append({"input_ids": ids, "attention_mask": mask, "target": torch.randn(size, generator=g) + i})
    return batches


class Recorder(Callback):
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def run_event(self, event: Event, state: Any, logger: Any) -> None:
        if event == Event.BATCH_END:
            self.weights.append(record(state.model))


def test_the_trainer_counts_tokens_from_the_batch_and_follows_the_oracle() -> None:
    batches = token_batches()
    ema, recorder = EMA(half_life="200tok"), Recorder()
    model = TokenModel()
    initial = record(model)
    Trainer(model, batches, "1ep", algorithms=[ema], callbacks=[recorder], progress_bar=False,
            optimizers=torch.optim.SGD(model.parameters(), lr=0.1)).fit()  # fmt: skip
    tokens = [batch_tokens(b) for b in batches]
    assert tokens == [int(b["attention_mask"].sum()) for b in batches]
    assert ema.timestamp.token == sum(tokens)
    recorded = [initial, *recorder.weights]
    error = max_error(ema.ema_tensors, ema_oracle(recorded, lambda n: 1 - 2 ** (-tokens[n - 1] / 200)))
    print(f"Trainer, half_life='200tok', padded batches 8->16->32: max |ema - oracle| = {error:.2e}")
    assert error < 2e-6


def test_the_trainer_refuses_a_token_half_life_when_batches_carry_no_tokens() -> None:
    model = tiny_model()
    loader = [(torch.randn(8, 4), torch.randn(8, 3)) for _ in range(3)]
    trainer = Trainer(model, loader, "1ep", algorithms=[EMA(half_life="100tok")], progress_bar=False,
                      loss_fn=nn.functional.mse_loss, optimizers=torch.optim.SGD(model.parameters(), lr=0.1))  # fmt: skip
    with pytest.raises(ValueError, match=r"counts tokens, and the Trainer counts them only in dict batches"):
        trainer.fit()
