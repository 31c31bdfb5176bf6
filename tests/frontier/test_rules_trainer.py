"""BEMA, the growing half-life and the sample/token clock in emakit's Trainer: a batch ramp of 8 -> 16 -> 32
padded dict batches, each rule against its float64 oracle over the training weights recorded after every
optimizer step, and a resume from a mid-epoch Trainer checkpoint equal to the uninterrupted run bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _frontends import RAMP, RULES, amounts, ramp_batches, token_data
from _oracle import max_error, record
from test_token_clock import Recorder, TokenModel

from emakit import Trainer
from emakit.averaging import Averager

EPOCHS = 3
#: Mid-epoch checkpoints: step 5 falls between two of BEMA's updates (every 2 steps), step 10 in the 2nd epoch.
RESUME_FROM = {"ep0-ba5.pt": 5, "ep1-ba10.pt": 10}


def batches() -> list[dict[str, torch.Tensor]]:
    """One epoch of the shared ramp's padded dict batches (the same data the Lightning and Transformers tests use)."""
    data = token_data()
    return [{key: value[indices] for key, value in data.items()} for indices in ramp_batches()]


def fit(averager: Averager, model: TokenModel, callbacks: list[Any], **saving: Any) -> Trainer:
    trainer = Trainer(model, batches(), f"{EPOCHS}ep", algorithms=[averager], callbacks=callbacks,
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), progress_bar=False,
                      **saving)  # fmt: skip
    trainer.fit()
    return trainer


@pytest.mark.parametrize("rule", ["bema", "half_life_fraction", "tokens", "samples"])
def test_each_rule_follows_its_oracle_and_resumes_bitwise_in_the_trainer(tmp_path: Path, rule: str) -> None:
    case = RULES[rule]
    model, averager, recorder = TokenModel(), case.make(), Recorder()
    initial = record(model)
    whole = fit(averager, model, [recorder], save_folder=tmp_path, save_interval="5ba")
    recorded = [initial, *recorder.weights]
    samples, tokens = amounts(token_data(), EPOCHS, padding_counts=False)
    assert len(recorded) == len(RAMP) * EPOCHS + 1
    assert (averager.timestamp.sample, averager.timestamp.token) == (sum(samples), sum(tokens))
    error = max_error(averager.ema_tensors, case.oracle(recorded, samples, tokens))
    print(f"Trainer, {rule}, batch 8->16->32: max |evaluated - float64 oracle| = {error:.2e}")
    assert error < 2e-6

    for checkpoint, done in RESUME_FROM.items():
        again = TokenModel()
        with torch.no_grad():
            for p in again.parameters():
                p.add_(1.0)  # the checkpoint, not the seed, must give the resumed weights
        resumed, rest = case.make(), Recorder()
        fit(resumed, again, [rest], load_path=tmp_path / checkpoint)
        assert len(rest.weights) == len(RAMP) * EPOCHS - done  # it resumed mid-run, not from the start
        assert resumed.timestamp == averager.timestamp, checkpoint
        assert resumed.n_averaged == averager.n_averaged, checkpoint
        for name, tensor in averager.ema_tensors.items():
            assert torch.equal(tensor, resumed.ema_tensors[name]), (checkpoint, name)
        for name, tensor in whole.state.model.state_dict().items():
            assert torch.equal(tensor, again.state_dict()[name]), (checkpoint, name)
