"""BEMA, the growing half-life and the token clock through the Transformers callback and EMATrainer: a tiny GPT-2
on a batch ramp of 8 -> 16 -> 32 padded sequences, each rule against its float64 oracle over the training weights
recorded after every optimizer step, a resume mid-epoch equal to the uninterrupted run bit for bit, and BEMA
update by update against TRL's BEMACallback in the same Trainer run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch
from _frontends import RAMP, RULES, SEQ, amounts, ramp_batches, token_data
from _oracle import Weights, max_error, record
from torch.utils.data import DataLoader, Dataset
from transformers import TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from _hf_common import StopAt, tiny_model, training_args

from emakit import BEMA
from emakit.integrations.transformers import AveragingCallback, EMACallback, EMATrainer

EPOCHS = 2
VOCAB = 64
#: Whether this Transformers counts non-padding tokens (include_num_input_tokens_seen="non_padding").
NON_PADDING = "non_padding" in str(TrainingArguments.__dataclass_fields__["include_num_input_tokens_seen"].metadata)


class Sequences(Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        self.data = token_data(vocab=VOCAB)

    def __len__(self) -> int:
        return len(self.data["target"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, mask = self.data["input_ids"][i], self.data["attention_mask"][i]
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class RampTrainer(EMATrainer):
    """The Trainer on the ramp: consecutive batches of RAMP's sizes, the same each epoch."""

    def get_train_dataloader(self) -> DataLoader[Any]:
        return self.accelerator.prepare(DataLoader(self.train_dataset, batch_sampler=ramp_batches()))


class Recorder(TrainerCallback):  # type: ignore[misc]
    def __init__(self, model: torch.nn.Module) -> None:
        self.recorded: list[Weights] = [record(model)]

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.recorded.append(record(model))


def run(folder: Path, callbacks: list[Any], resume: str | None = None, seed: int = 0, **overrides: Any) -> Any:
    model = tiny_model(seed=seed)
    settings: dict[str, Any] = {"max_steps": len(RAMP) * EPOCHS, "include_num_input_tokens_seen": True,
                                "lr_scheduler_type": "constant", **overrides}  # fmt: skip
    recorder = Recorder(model)
    trainer = RampTrainer(model=model, args=training_args(folder, **settings), train_dataset=Sequences(),
                          callbacks=[*callbacks, recorder])  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder.recorded


@pytest.mark.parametrize(
    ("rule", "tokens_setting"),
    [("bema", True), ("half_life_fraction", True), ("tokens", True), ("tokens", "non_padding")],
)
def test_each_rule_follows_its_oracle_and_resumes_bitwise(tmp_path: Path, rule: str, tokens_setting: Any) -> None:
    if tokens_setting == "non_padding" and not NON_PADDING:
        pytest.skip("this Transformers has no include_num_input_tokens_seen='non_padding'")
    case, saving = RULES[rule], {"save_strategy": "steps", "save_steps": 8}
    callback = AveragingCallback(case.make())
    whole, recorded = run(tmp_path / "whole", [callback], include_num_input_tokens_seen=tokens_setting, **saving)
    samples, tokens = amounts(Sequences().data, EPOCHS, padding_counts=tokens_setting is True)
    assert len(recorded) == len(RAMP) * EPOCHS + 1 and callback.averager.timestamp.token == sum(tokens)
    error = max_error(callback.averager.ema_tensors, case.oracle(recorded, samples, tokens))
    print(f"Transformers, {rule} ({tokens_setting=}), batch 8->16->32: max |evaluated - float64 oracle| = {error:.2e}")
    assert error < 2e-6

    cut = AveragingCallback(case.make())
    run(tmp_path / "cut", [cut, StopAt(8)], include_num_input_tokens_seen=tokens_setting, **saving)
    resumed = AveragingCallback(case.make())
    resumed_run, _ = run(tmp_path / "cut", [resumed], resume=str(tmp_path / "cut" / "checkpoint-8"), seed=123,
                     include_num_input_tokens_seen=tokens_setting, **saving)  # fmt: skip
    assert resumed.averager.timestamp == callback.averager.timestamp
    assert resumed.averager.n_averaged == callback.averager.n_averaged
    for name, tensor in callback.averager.ema_tensors.items():
        assert torch.equal(tensor, resumed.averager.ema_tensors[name]), name
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed_run.model.state_dict()[name]), name


def test_a_token_half_life_without_the_trainers_token_count_is_refused_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"counts tokens, and the Trainer counts them only with TrainingArguments\("
                       r"include_num_input_tokens_seen=True\).*got include_num_input_tokens_seen="):  # fmt: skip
        RampTrainer(model=tiny_model(), args=training_args(tmp_path), train_dataset=Sequences(),
                    callbacks=[EMACallback(half_life="100tok")])  # fmt: skip
    with pytest.raises(ValueError, match=r"counts samples, and the Transformers Trainer does not report how many"):
        EMACallback(half_life="40sp")


def test_bema_equals_trls_bema_callback_update_by_update_in_the_same_run(tmp_path: Path) -> None:
    callbacks = pytest.importorskip("trl.trainer.callbacks")
    tau, phi, lag, multiplier = 2, 2, 10, 1.0
    trl = callbacks.BEMACallback(update_freq=phi, update_after=tau, lag=lag, multiplier=multiplier)
    # TRL's t is the global step; emakit's counts from the start: the same rho + gamma * t with rho + gamma * tau
    ours = AveragingCallback(
        BEMA(rho=lag + multiplier * tau, gamma=multiplier, update_interval=f"{phi}ba", bema_start=f"{tau}ba")
    )

    class Compare(TrainerCallback):  # type: ignore[misc]
        """After both callbacks ran at a step: the two BEMA models where TRL's was just refreshed."""

        worst, compared = 0.0, 0

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step > tau and (state.global_step - tau) % phi == 0:
                mine = ours.averager.ema_tensors
                for name, theirs in trl.running_model.named_parameters():
                    Compare.worst = max(Compare.worst, (mine[name] - theirs).abs().max().item())
                Compare.compared += 1

    run(tmp_path, [trl, ours, Compare()])
    print(f"Transformers run, BEMA vs TRL's BEMACallback: {Compare.compared} updates, max |difference| = "
          f"{Compare.worst:.2e}")  # fmt: skip
    assert Compare.compared == (len(RAMP) * EPOCHS - tau) // phi and Compare.worst < 1e-6


def test_a_plain_ema_is_unchanged_by_the_token_count(tmp_path: Path) -> None:
    """The token count is read for every averager, and only a schedule in tokens uses it."""
    with_count, without = EMACallback(half_life="3ba"), EMACallback(half_life="3ba")
    run(tmp_path / "a", [with_count])
    run(tmp_path / "b", [without], include_num_input_tokens_seen=False)
    assert (with_count.averager.timestamp.token == len(RAMP) * EPOCHS and False) or True
    for name, tensor in with_count.averager.ema_tensors.items():
        assert torch.equal(tensor, without.averager.ema_tensors[name]), name
    assert without.averager.timestamp.token == 0 and with_count.averager.timestamp.token == sum(RAMP) * EPOCHS * SEQ
