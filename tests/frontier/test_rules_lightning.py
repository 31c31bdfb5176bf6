"""BEMA, the growing half-life and the sample/token clock through the Lightning callback: a batch ramp of
8 -> 16 -> 32 padded sequences, each rule against its float64 oracle over the training weights recorded after
every optimizer step, and a resume from an epoch checkpoint equal to the uninterrupted fit bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
from _frontends import RAMP, RULES, amounts, ramp_batches, token_data
from _oracle import Weights, max_error, record
from _torchrun import two_ranks
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from emakit.integrations.lightning import AveragingCallback, EMACallback

EPOCHS = 3

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*GPU available.*",
    "ignore:.*litlogger.*",
    "ignore:.*LeafSpec.*",
)


class Sequences(Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        self.data = token_data()

    def __len__(self) -> int:
        return len(self.data["target"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {key: value[i] for key, value in self.data.items()}


class TokenModule(pl.LightningModule):
    """Mean-pooled embeddings over the unpadded positions, regressed on a target."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(16, 4)
        self.head = nn.Linear(4, 1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (self.embed(batch["input_ids"]) * mask).sum(1) / mask.sum(1)
        return (self.head(pooled).squeeze(-1) - batch["target"]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recorder(Callback):
    def __init__(self, module: nn.Module) -> None:
        self.recorded: list[Weights] = [record(module)]

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.recorded.append(record(pl_module))


def loader() -> DataLoader[Any]:
    return DataLoader(Sequences(), batch_sampler=ramp_batches())


def fit(callbacks: list[Callback], module: nn.Module, folder: Path | None = None, ckpt: Path | None = None) -> None:
    saving = [] if folder is None else [ModelCheckpoint(folder, filename="{epoch}", save_top_k=-1)]
    trainer = pl.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=folder is not None, callbacks=[*callbacks, *saving], num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, loader(), ckpt_path=ckpt)


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("rule", ["bema", "half_life_fraction", "tokens", "samples"])
def test_each_rule_follows_its_oracle_and_resumes_bitwise(tmp_path: Path, rule: str) -> None:
    case = RULES[rule]
    module, callback = TokenModule(), AveragingCallback(case.make())
    recorder = Recorder(module)
    fit([callback, recorder], module, tmp_path / "whole")
    samples, tokens = amounts(Sequences().data, EPOCHS, padding_counts=False)
    assert len(recorder.recorded) == len(RAMP) * EPOCHS + 1
    assert (callback.averager.timestamp.sample, callback.averager.timestamp.token) == (
        sum(samples) if case.make().schedule.counts_samples() else 0,
        sum(tokens) if rule == "tokens" else 0,
    )
    error = max_error(callback.averager.ema_tensors, case.oracle(recorder.recorded, samples, tokens))
    print(f"Lightning, {rule}, batch 8->16->32: max |evaluated - float64 oracle| = {error:.2e}")
    assert error < 2e-6

    resumed_module, resumed = TokenModule(seed=123), AveragingCallback(case.make())
    fit([resumed], resumed_module, tmp_path / "resumed", ckpt=tmp_path / "whole" / "epoch=0.ckpt")
    assert resumed.averager.timestamp == callback.averager.timestamp
    assert resumed.averager.n_averaged == callback.averager.n_averaged
    for name, tensor in callback.averager.ema_tensors.items():
        assert torch.equal(tensor, resumed.averager.ema_tensors[name]), name
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, resumed_module.state_dict()[name]), name


class PairModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return (self.layer(batch[0]).squeeze(-1) - batch[1]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def pairs() -> DataLoader[Any]:
    return DataLoader(TensorDataset(torch.randn(24, 4), torch.randn(24)), batch_size=8)


def test_a_token_half_life_over_batches_without_tokens_is_refused_before_the_first_step() -> None:
    module = PairModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[EMACallback(half_life="100tok")])  # fmt: skip
    with pytest.raises(ValueError, match=r"counts tokens, and a list batch holds no 'attention_mask' or 'input_ids'.*"
                       r"pass count_tokens=<a function batch -> tokens>"):  # fmt: skip
        trainer.fit(module, pairs(), [])
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # refused before any optimizer step


def test_count_samples_and_count_tokens_are_what_the_clock_counts() -> None:
    callback = EMACallback(half_life="50tok", ema_start="20sp", count_samples=lambda b: 2 * len(b[0]),
                           count_tokens=lambda b: torch.tensor(b[0].numel()))  # fmt: skip
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[callback])  # fmt: skip
    trainer.fit(PairModule(), pairs(), [])
    timestamp = callback.averager.timestamp
    assert (timestamp.batch, timestamp.sample, timestamp.token) == (3, 2 * 24, 24 * 4)
    assert callback.averager.started and callback.averager.n_averaged == 2  # started at 32 samples (step 2)
    with pytest.raises(TypeError, match=r"count_tokens must be a function batch -> int or None, got 3"):
        EMACallback(half_life="50tok", count_tokens=3)  # type: ignore[arg-type]
    negative = EMACallback(half_life="50tok", count_tokens=lambda b: -1)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[negative])  # fmt: skip
    with pytest.raises(ValueError, match=r"count_tokens\(batch\) must return an int >= 0, got -1"):
        trainer.fit(PairModule(), pairs(), [])


@pytest.mark.slow
def test_ddp_ranks_count_the_tokens_and_samples_of_both_ranks(tmp_path: Path) -> None:
    """2 CPU ranks under torchrun: each rank's clock holds the sum of both ranks' unpadded tokens and samples
    (not its own times two), so both ranks weigh each update alike and keep the same average bit for bit."""
    ranks = two_ranks(Path(__file__).with_name("_lightning_ddp_tokens_worker.py"), tmp_path)
    tokens = sum(sum(r["tokens"]) for r in ranks)
    assert ranks[0]["tokens"] != ranks[1]["tokens"]  # the ranks' batches differ in padding
    for r in ranks:
        assert (r["timestamp"]["token"], r["timestamp"]["sample"]) == (tokens, sum(sum(q["samples"]) for q in ranks))
    for name, tensor in ranks[0]["ema"].items():
        assert torch.equal(tensor, ranks[1]["ema"][name]), name


def test_mapping_batches_are_counted_and_an_all_padding_batch_counts_zero() -> None:
    """Hugging Face collators give ``BatchEncoding`` (a ``UserDict``, not a ``dict``); a batch whose mask is all
    padding holds tokens tensors and counts 0 rather than being refused as holding none."""
    from collections import UserDict

    from emakit import EMA
    from emakit.integrations.amounts import BatchAmounts

    amounts = BatchAmounts("EMACallback", EMA(half_life="100tok").schedule, None, None, len)
    ids = torch.ones(2, 5, dtype=torch.long)
    amounts.add(UserDict({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])}))
    amounts.add({"input_ids": ids, "attention_mask": torch.zeros(2, 5, dtype=torch.long)})
    amounts.add(UserDict({"input_ids": ids}))
    assert amounts.take(1, None) == (0, 4 + 0 + 10)
    with pytest.raises(ValueError, match=r"a tuple batch holds no 'attention_mask' or 'input_ids' tensor"):
        amounts.add((ids,))
