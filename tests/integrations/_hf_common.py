"""Tiny Transformers models, data and Trainer arguments for the Hugging Face integration tests and workers.

A 2-layer GPT-2 with vocabulary 64 and width 32 (its output layer is tied to the token embedding), built
from a config (no download), trained as a language model on random tokens made here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

VOCAB, SEQ = 64, 8


def tiny_config(dropout: float = 0.0) -> GPT2Config:
    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
    )


def tiny_model(seed: int = 0, dropout: float = 0.0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_config(dropout))


class TokenData(torch.utils.data.Dataset):
    """``n`` random sequences of ``SEQ`` tokens; the labels are the inputs (the model shifts them)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def training_args(output_dir: str | Path, **overrides: Any) -> TrainingArguments:
    """CPU, no logging, no reports, a visible learning rate; ``overrides`` on top."""
    kwargs: dict[str, Any] = {
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 1e-2,
        "max_steps": 6,
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 1,
        "dataloader_num_workers": 0,
    }
    kwargs.update(overrides)
    return TrainingArguments(str(output_dir), **kwargs)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable parameters, by name (tied ones once)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class Recorder(TrainerCallback):  # type: ignore[misc]
    """Records the training weights after every optimizer step and at every epoch end."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.at_epoch_end: list[dict[str, torch.Tensor]] = []
        self.epochs: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.after_step.append(weights(model))

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.at_epoch_end.append(weights(model))
        self.epochs.append(float(state.epoch))


class StopAt(TrainerCallback):  # type: ignore[misc]
    """Ends training after optimizer step ``step``, as if the job were killed right after that checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            control.should_training_stop = True


def ema_reference(
    after_step: list[dict[str, torch.Tensor]], smoothing: float, start: int = 1, interval: int = 1
) -> dict[str, torch.Tensor]:
    """The EMA from its definition, in float64: a copy of the weights after optimizer step ``start``, then
    ``ema = smoothing * ema + (1 - smoothing) * weights`` after every step ``k > start`` with ``k % interval == 0``.
    ``after_step[k - 1]`` holds the weights after step ``k``."""
    ema = {n: t.double() for n, t in after_step[start - 1].items()}
    for k in range(start + 1, len(after_step) + 1):
        if k % interval == 0:
            ema = {n: smoothing * e + (1 - smoothing) * after_step[k - 1][n].double() for n, e in ema.items()}
    return {n: t.float() for n, t in ema.items()}
