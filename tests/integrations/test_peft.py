"""The EMA of a PEFT LoRA model's adapters alone (tiny GPT-2 built from a config, no download).

Checked against: a naive average of the adapter weights recorded after each step; the adapters' own bytes;
PEFT's ``PeftModel.from_pretrained`` on the exported folder (same logits as the model holding the EMA); the
plain Trainer's evaluation of that loaded model; an uninterrupted run for resuming.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _hf_common import StopAt, TokenData, tiny_model, training_args
from _hf_readme import readme_blocks

from emakit import EMA
from emakit.integrations.transformers import EMACallback, EMATrainer

TRAIN, EVAL = TokenData(40, seed=0), TokenData(16, seed=1)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lora_model(seed: int = 0) -> Any:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    torch.manual_seed(seed + 100)  # the adapters' initialisation
    return get_peft_model(tiny_model(seed), config)


def adapters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def train_by_hand(model: torch.nn.Module, ema: EMA, steps: int) -> list[dict[str, torch.Tensor]]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    records = []
    for _ in range(steps):
        x = torch.randint(0, 64, (4, 8), generator=gen)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        records.append(adapters(model))
        ema.step()
    return records


def naive(records: list[dict[str, torch.Tensor]], smoothing: float) -> dict[str, torch.Tensor]:
    average = {n: t.double() for n, t in records[0].items()}
    for weights in records[1:]:
        average = {n: smoothing * a + (1 - smoothing) * weights[n].double() for n, a in average.items()}
    return average


@pytest.mark.parametrize("flatten", [False, True])
def test_the_ema_of_a_lora_model_holds_the_adapters_alone(flatten: bool, tmp_path: Path) -> None:
    model = lora_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ema = EMA(
        half_life=["2ba", "4ba"],
        params="trainable",
        flatten_model=flatten,
        snapshot_interval="2ba",
        snapshot_folder=tmp_path / "snapshots",
    )
    ema.attach(model)
    records = train_by_hand(model, ema, 6)
    names = set(records[0])
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    for j, half_life in enumerate((2, 4)):
        state = ema.state_dict()
        average = state["ema"] if j == 0 else state["more_averages"][0]
        assert set(average) == names
        for name, value in naive(records, 2 ** (-1 / half_life)).items():
            torch.testing.assert_close(average[name].double(), value, rtol=1e-5, atol=1e-6)
    # memory: every average is the adapters' bytes, nothing of the base model
    state = ema.state_dict()
    assert nbytes(state["ema"].values()) == nbytes(p for p in model.parameters() if p.requires_grad)
    full = EMA(smoothing=0.5, params="all")
    full.attach(model)
    full.step()
    print(
        f"\nEMA bytes, tiny GPT-2 + LoRA r=4: adapters only {nbytes(state['ema'].values())}, "
        f"whole model {nbytes(full.state_dict()['ema'].values())}"
    )
    # the base model is shared by ema_model, untouched by the swap, and equal to what it was
    ema_model = ema.ema_model
    for (name, value), (ema_name, ema_param) in zip(
        model.named_parameters(), ema_model.named_parameters(), strict=True
    ):
        assert name == ema_name
        if name in base:
            assert ema_param.data_ptr() == value.data_ptr() and torch.equal(value, base[name])
    snapshots = sorted((tmp_path / "snapshots").glob("snapshot-*.safetensors"))
    assert len(snapshots) == 3


def test_the_exported_adapter_loads_with_peft_and_gives_the_ema_logits(tmp_path: Path) -> None:
    model = lora_model()
    ema = EMA(smoothing=0.6, params="trainable")
    ema.attach(model)
    train_by_hand(model, ema, 5)
    x = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(9))
    model.eval()
    with ema.average_parameters():
        expected = model(input_ids=x).logits
        model.save_pretrained(tmp_path / "adapter")  # PEFT's own format, from the model holding the EMA
    assert not torch.equal(model(input_ids=x).logits, expected)  # the training weights are back
    loaded = PeftModel.from_pretrained(tiny_model(0), tmp_path / "adapter").eval()
    assert torch.equal(loaded(input_ids=x).logits, expected)
    for name, value in ema.ema_tensors.items():
        assert torch.equal(dict(loaded.named_parameters())[name], value), name


class Recorder(TrainerCallback):  # type: ignore[misc]
    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.after_step.append(adapters(model))


def run(out: Path, callback: EMACallback, *extra: TrainerCallback, resume: Any = None, **overrides: Any) -> Trainer:
    trainer = EMATrainer(
        model=lora_model(),
        args=training_args(out, **overrides),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        callbacks=[callback, *extra],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_ema_trainer_evaluates_and_saves_the_ema_adapter(tmp_path: Path) -> None:
    callback, recorder = EMACallback(smoothing=0.7, params="trainable", save_ema_as_model=True), Recorder()
    trainer = run(tmp_path / "run", callback, recorder, max_steps=6)
    expected = naive(recorder.after_step, 0.7)
    for name, value in expected.items():
        torch.testing.assert_close(callback.averager.ema_tensors[name].double(), value, rtol=1e-5, atol=1e-6)
    got = trainer.evaluate()
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(tiny_model(0), tmp_path / "saved")
    for name, value in callback.averager.ema_tensors.items():
        assert torch.equal(dict(loaded.named_parameters())[name], value), name
    by_hand = Trainer(model=loaded, args=training_args(tmp_path / "hand"), eval_dataset=EVAL).evaluate()
    assert got["eval_loss"] == pytest.approx(by_hand["eval_loss"], rel=1e-6)
    for name, value in adapters(trainer.model).items():  # the training adapter is back after both
        assert torch.equal(value, recorder.after_step[-1][name]), name


def test_ema_trainer_resumes_a_lora_run_exactly(tmp_path: Path) -> None:
    settings = {"max_steps": 8, "save_strategy": "steps", "save_steps": 5}
    full = EMACallback(half_life="2ba", params="trainable")
    reference = run(tmp_path / "full", full, **settings)
    run(tmp_path / "cut", EMACallback(half_life="2ba", params="trainable"), StopAt(5), **settings)
    resumed_callback = EMACallback(half_life="2ba", params="trainable")
    resumed = run(tmp_path / "cut", resumed_callback, resume=str(tmp_path / "cut" / "checkpoint-5"), **settings)
    for name, value in adapters(reference.model).items():
        assert torch.equal(adapters(resumed.model)[name], value), name
    assert set(resumed_callback.averager.ema_tensors) == set(full.averager.ema_tensors)
    for name, value in full.averager.ema_tensors.items():
        assert torch.equal(resumed_callback.averager.ema_tensors[name], value), name


def test_guide_lora_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = readme_blocks("LoRA adapters (PEFT)", "transformers.md")
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/guides/transformers.md", "exec"), {"__name__": "__readme__"})
